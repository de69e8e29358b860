//! Exit codes of `flotilla`, one place for all of them (README "Exit codes" mirrors this).

/// Why the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success (for a wave: it completed).
    Ok,
    /// 1: a wave finished with failed tenants.
    WaveFailed,
    /// 2: usage error (bad flags; clap exits with 2 itself).
    Usage,
    /// 3: a wave is paused or was cancelled.
    WaveStopped,
    /// 4: cannot reach the daemon.
    Unavailable,
    /// 5: the daemon refused the token.
    Unauthorized,
    /// 6: invalid input: a bundle, targets or a request the daemon rejected.
    InvalidInput,
    /// 10: anything else (a bug or an I/O failure of the CLI itself).
    Internal,
}

impl Exit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::WaveFailed => 1,
            Exit::Usage => 2,
            Exit::WaveStopped => 3,
            Exit::Unavailable => 4,
            Exit::Unauthorized => 5,
            Exit::InvalidInput => 6,
            Exit::Internal => 10,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}
