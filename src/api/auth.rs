//! Bearer-token authentication and role checks for the control API. Tokens are known only
//! by their SHA-256; a presented token is hashed and compared against every known hash in
//! constant time, so neither timing nor an early exit tells which one nearly matched.
//! This module decides who is calling and whether they may; it never logs a token.

use subtle::ConstantTimeEq as _;
use tonic::metadata::MetadataMap;

use super::ApiError;
use crate::config::{Role, TokenConfig, hash_token};

/// The actor recorded when the daemon runs without tokens.
pub const ANONYMOUS: &str = "anonymous";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: the actor of the state changes this caller makes.
    pub name: String,
    pub role: Role,
}

struct Known {
    name: String,
    role: Role,
    hash: [u8; 32],
}

/// Checks the `authorization: Bearer …` header of each call.
pub struct Authenticator {
    tokens: Vec<Known>,
}

impl Authenticator {
    /// No tokens configured: every call is allowed, as [`ANONYMOUS`] operator.
    pub fn open() -> Self {
        Self { tokens: Vec::new() }
    }

    /// Tokens already checked by [`crate::config::check_tokens`].
    pub fn new(tokens: &[TokenConfig]) -> Result<Self, crate::config::ConfigError> {
        crate::config::check_tokens(tokens)?;
        let tokens = tokens
            .iter()
            .map(|t| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&t.sha256, &mut hash).map_err(|e| {
                    crate::config::ConfigError::Token {
                        name: t.name.clone(),
                        message: e.to_string(),
                    }
                })?;
                Ok(Known {
                    name: t.name.clone(),
                    role: t.role,
                    hash,
                })
            })
            .collect::<Result<_, crate::config::ConfigError>>()?;
        Ok(Self { tokens })
    }

    /// True when calls need a token.
    pub fn is_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The caller of a request that needs `need` to do `what` (named in refusals).
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        need: Role,
        what: &str,
    ) -> Result<Caller, ApiError> {
        let caller = self.authenticate(metadata)?;
        if caller.role < need {
            return Err(ApiError::PermissionDenied(format!(
                "token {:?} has role {}; {what} needs {}",
                caller.name,
                caller.role.as_str(),
                need.as_str()
            )));
        }
        Ok(caller)
    }

    /// Who is calling, from the bearer token alone: what [`TokenCheck`] asks before a
    /// request's body is even decoded.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        if self.tokens.is_empty() {
            return Ok(Caller {
                name: ANONYMOUS.to_string(),
                role: Role::Operator,
            });
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| ApiError::Unauthenticated("missing bearer token".into()))?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthenticated("authorization header is not `Bearer <token>`".into())
            })?;
        let mut presented_hash = [0u8; 32];
        // hash_token gives valid hex of 32 bytes by construction.
        if hex::decode_to_slice(hash_token(presented), &mut presented_hash).is_err() {
            return Err(ApiError::Unauthenticated("unknown token".into()));
        }
        let mut found: Option<&Known> = None;
        for known in &self.tokens {
            // Visit every entry whatever matched, so the time taken is the same.
            let equal = bool::from(known.hash.ct_eq(&presented_hash));
            if equal {
                found = Some(known);
            }
        }
        let known = found.ok_or_else(|| ApiError::Unauthenticated("unknown token".into()))?;
        Ok(Caller {
            name: known.name.clone(),
            role: known.role,
        })
    }
}

/// Refuses a call without a known token before its body is decoded, so nobody without
/// a token can make the daemon read and buffer a request as large as the limits allow.
/// Roles are checked per call, once the request says what it wants.
#[derive(Clone)]
pub struct TokenCheck(pub std::sync::Arc<Authenticator>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.0.authenticate(request.metadata())?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().expect("ascii"));
        }
        m
    }

    fn auth() -> Authenticator {
        Authenticator::new(&[
            TokenConfig {
                name: "ci".into(),
                role: Role::Operator,
                sha256: hash_token("op-secret"),
            },
            TokenConfig {
                name: "dash".into(),
                role: Role::Viewer,
                sha256: hash_token("view-secret"),
            },
        ])
        .expect("valid")
    }

    #[test]
    fn roles_and_refusals() {
        let a = auth();
        let caller = a
            .authorize(&metadata(Some("Bearer op-secret")), Role::Operator, "pause")
            .expect("operator");
        assert_eq!(caller.name, "ci");
        let viewer = a
            .authorize(&metadata(Some("Bearer view-secret")), Role::Viewer, "get")
            .expect("viewer reads");
        assert_eq!(viewer.role, Role::Viewer);
        let denied = a
            .authorize(
                &metadata(Some("Bearer view-secret")),
                Role::Operator,
                "pause a wave",
            )
            .unwrap_err();
        assert!(
            matches!(&denied, ApiError::PermissionDenied(m) if m.contains("dash") && m.contains("pause a wave"))
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Basic op-secret"),
            Some("op-secret"),
        ] {
            let err = a
                .authorize(&metadata(bad), Role::Viewer, "get")
                .unwrap_err();
            assert!(matches!(err, ApiError::Unauthenticated(_)), "{bad:?}");
        }
    }

    #[test]
    fn open_mode_allows_everything_as_anonymous() {
        let caller = Authenticator::open()
            .authorize(&metadata(None), Role::Operator, "start")
            .expect("open");
        assert_eq!(caller.name, ANONYMOUS);
    }
}
