//! What went wrong talking to a tenant's PostgreSQL, and whether trying again can help.
//! A server error is judged by its SQLSTATE; one seen on our side by its
//! [`FailureKind`] (a broken connection, a deadline, TLS, a refusal) — never by words.
//!
//! This is the one place errors are classified (PRODUCT.md §4): connection loss and I/O
//! (SQLSTATE class 08), serialization failure 40001, deadlock 40P01, lock timeout 55P03,
//! admin/crash/cannot-connect-now shutdowns 57P01–57P03, too many connections 53300 and
//! a session the server ended as idle (25P03, 57P05) are retryable; everything else is permanent — a protocol violation (08P01) too: it is
//! middleware Flotilla cannot work through (a pooler refusing its startup options), not
//! a blip. A cancelled statement (57014) is retryable when someone else cancelled it and
//! permanent when it was our own `statement_timeout`: the caller knows which and says so
//! with [`DbFailure::cancelled_by`]. Nothing else in the library decides retryability. Messages never carry connection-string secrets: tokio-postgres errors
//! do not include the password, and callers identify tenants by redacted DSN only.

use std::fmt;

/// Whether a failure may go away by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retryability {
    /// Try again later (with backoff).
    Retryable,
    /// Trying again gives the same result until someone changes something.
    Permanent,
}

/// What kind of failure it is: the server's (judged by its SQLSTATE), or one seen on
/// our side, judged by its kind — never by the words of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The server answered with an error (see the SQLSTATE).
    Server,
    /// The connection broke, or never came up: the server may be back soon.
    ConnectionLost,
    /// We gave up waiting (the connect deadline).
    TimedOut,
    /// TLS could not be set up or the server's certificate was refused.
    Tls,
    /// Configuration or policy says no (`allowed_hosts`, a root file, a pooler that
    /// is not a session, a DSN that does not parse): the same until someone changes it.
    Refused,
    /// Something answered what Flotilla does not expect (a log row it cannot read).
    Unexpected,
}

impl FailureKind {
    /// Retryable or permanent, for failures without a SQLSTATE.
    pub fn retryability(self) -> Retryability {
        match self {
            FailureKind::ConnectionLost | FailureKind::TimedOut => Retryability::Retryable,
            FailureKind::Server
            | FailureKind::Tls
            | FailureKind::Refused
            | FailureKind::Unexpected => Retryability::Permanent,
        }
    }
}

/// A database error reduced to what operators and the scheduler need.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DbFailure {
    /// The SQLSTATE, when the server sent one.
    pub sqlstate: Option<String>,
    /// The server's message (or the client's, for I/O errors).
    pub message: String,
    /// Retryable or permanent.
    pub retryability: Retryability,
    /// Where it came from.
    pub kind: FailureKind,
}

impl fmt::Display for DbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sqlstate {
            Some(code) => write!(f, "{} (SQLSTATE {code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Classifies a SQLSTATE.
pub fn classify_sqlstate(code: &str) -> Retryability {
    let retryable = (code.starts_with("08") && code != "08P01")
        || matches!(
            code,
            "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300"
                // The server ended an idle session (idle_in_transaction_session_timeout,
                // idle_session_timeout): it rolled back; a new session may go on.
                | "25P03" | "57P05"
        );
    if retryable {
        Retryability::Retryable
    } else {
        Retryability::Permanent
    }
}

impl DbFailure {
    /// A failure seen on our side (no SQLSTATE); its kind decides whether to retry.
    pub fn of_kind(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            sqlstate: None,
            message: message.into(),
            retryability: kind.retryability(),
            kind,
        }
    }

    /// True when trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryability == Retryability::Retryable
    }

    /// True for SQLSTATE 57014: the statement was cancelled, by a timeout or by someone.
    pub fn is_cancelled_statement(&self) -> bool {
        self.sqlstate.as_deref() == Some(QUERY_CANCELED)
    }

    /// A cancelled statement (57014) classified by its cause: our `statement_timeout`
    /// will fire again (permanent); a cancel from another session — a DBA, a lock-queue
    /// watchdog — may not (retryable). The message says which.
    pub fn cancelled_by(mut self, cause: CancelCause) -> Self {
        let (what, retryability) = match cause {
            CancelCause::StatementTimeout { after } => (
                format!("statement_timeout ({after:?}) reached"),
                Retryability::Permanent,
            ),
            CancelCause::Watchdog(why) => (
                format!("cancelled by the lock watchdog ({why}); will retry"),
                Retryability::Retryable,
            ),
            CancelCause::External => (
                "cancelled by another session (pg_cancel_backend); will retry".to_string(),
                Retryability::Retryable,
            ),
        };
        self.message = format!("{what}: {}", self.message);
        self.retryability = retryability;
        self
    }

    /// True when the connection itself was lost (no server error): what ran last may
    /// have committed without our hearing of it.
    pub fn is_connection_lost(&self) -> bool {
        self.kind == FailureKind::ConnectionLost
    }
}

/// SQLSTATE of a cancelled statement.
pub const QUERY_CANCELED: &str = "57014";

/// Who cancelled a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelCause {
    /// It ran at least as long as the `statement_timeout` in force.
    StatementTimeout { after: std::time::Duration },
    /// Flotilla's lock-queue watchdog: the session kept an application query waiting
    /// past `max_block` (what and how long).
    Watchdog(String),
    /// It was cancelled sooner: by another session.
    External,
}

impl CancelCause {
    /// Which cause fits a statement that ran `elapsed` under `timeout` (zero: none).
    pub fn judge(timeout: std::time::Duration, elapsed: std::time::Duration) -> Self {
        if !timeout.is_zero() && elapsed >= timeout {
            CancelCause::StatementTimeout { after: timeout }
        } else {
            CancelCause::External
        }
    }
}

impl From<&tokio_postgres::Error> for DbFailure {
    fn from(e: &tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let mut message = db.message().to_string();
            if let Some(detail) = db.detail() {
                message.push_str(": ");
                message.push_str(detail);
            }
            return Self {
                sqlstate: Some(code.to_string()),
                message,
                retryability: classify_sqlstate(code),
                kind: FailureKind::Server,
            };
        }
        // No server error: judged by what is in the error's chain of causes.
        let mut message = e.to_string();
        let mut kind = if e.is_closed() {
            FailureKind::ConnectionLost
        } else {
            FailureKind::Unexpected
        };
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            kind = match cause_kind(s) {
                // A refused certificate stays refused: it is not a network hiccup.
                Some(FailureKind::Tls) => FailureKind::Tls,
                Some(k) if kind != FailureKind::Tls => k,
                _ => kind,
            };
            source = s.source();
        }
        Self::of_kind(kind, message)
    }
}

/// The kind one cause in an error chain stands for, if it says.
fn cause_kind(cause: &(dyn std::error::Error + 'static)) -> Option<FailureKind> {
    if cause.is::<rustls::Error>() {
        return Some(FailureKind::Tls);
    }
    let io = cause.downcast_ref::<std::io::Error>()?;
    // tokio-rustls reports TLS failures as I/O errors wrapping the rustls error.
    if io
        .get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>())
    {
        return Some(FailureKind::Tls);
    }
    Some(match io.kind() {
        std::io::ErrorKind::TimedOut => FailureKind::TimedOut,
        _ => FailureKind::ConnectionLost,
    })
}

impl From<tokio_postgres::Error> for DbFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_sqlstates() {
        for code in [
            "08000", "08006", "40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300",
            "25P03", "57P05",
        ] {
            assert_eq!(classify_sqlstate(code), Retryability::Retryable, "{code}");
        }
        for code in [
            "22012", "42P01", "23505", "42601", "57014", "53100", "28P01", "08P01",
        ] {
            assert_eq!(classify_sqlstate(code), Retryability::Permanent, "{code}");
        }
    }

    #[test]
    fn a_cancel_is_judged_by_the_timeout_in_force() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        assert_eq!(
            CancelCause::judge(ms(100), ms(150)),
            CancelCause::StatementTimeout { after: ms(100) }
        );
        assert_eq!(CancelCause::judge(ms(100), ms(20)), CancelCause::External);
        assert_eq!(
            CancelCause::judge(Duration::ZERO, ms(5_000)),
            CancelCause::External
        );
        let f = DbFailure {
            sqlstate: Some(QUERY_CANCELED.into()),
            message: "canceling statement due to user request".into(),
            retryability: Retryability::Permanent,
            kind: FailureKind::Server,
        };
        assert!(f.clone().cancelled_by(CancelCause::External).is_retryable());
        let timed_out = f.cancelled_by(CancelCause::StatementTimeout { after: ms(100) });
        assert!(!timed_out.is_retryable());
        assert!(
            timed_out.message.starts_with("statement_timeout"),
            "{timed_out}"
        );
    }
}
