//! Sealing connection strings for the progress store, so that a password never sits
//! there in the clear (PRODUCT.md §1.5) while a restarted daemon can still reconnect to
//! every tenant of a resumed wave.
//!
//! The key is 32 random bytes in `secret.key` in the data dir, created with mode 0600 on
//! first start; seal with ChaCha20-Poly1305 and a random nonce per value. This protects
//! the store file (backups, support bundles, `strings`), not a reader of the whole data
//! dir. This module never logs what it seals.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// Seals and opens secrets with the data dir's key.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret key file {0} is not 32 bytes: was it replaced?")]
    BadKey(String),
    #[error("a sealed secret does not open with this data dir's key (was secret.key replaced?)")]
    Open,
}

impl Sealer {
    /// Opens `path`, creating a new random key there if it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self, SecretError> {
        let key_error = |source| SecretError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ChaCha20Poly1305::generate_key(&mut OsRng);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(key_error)?;
                f.write_all(key.as_slice()).map_err(key_error)?;
                f.sync_all().map_err(key_error)?;
                key.to_vec()
            }
            Err(e) => return Err(key_error(e)),
        };
        if bytes.len() != 32 {
            return Err(SecretError::BadKey(path.display().to_string()));
        }
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
        })
    }

    /// Seals `plaintext`: hex of nonce and ciphertext.
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Encryption with a fresh nonce and an in-memory buffer cannot fail.
        let sealed = self
            .cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend(sealed);
        hex::encode(out)
    }

    /// Opens what [`seal`](Self::seal) made.
    pub fn open(&self, sealed: &str) -> Result<String, SecretError> {
        let bytes = hex::decode(sealed).map_err(|_| SecretError::Open)?;
        if bytes.len() < 12 {
            return Err(SecretError::Open);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| SecretError::Open)?;
        String::from_utf8(plain).map_err(|_| SecretError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_no_plaintext() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret.key");
        let sealer = Sealer::open_or_create(&path).expect("create");
        let sealed = sealer.seal("postgresql://u:hunter2@h/db");
        assert!(!sealed.contains("hunter2"));
        assert_ne!(
            sealed,
            sealer.seal("postgresql://u:hunter2@h/db"),
            "fresh nonce"
        );
        let again = Sealer::open_or_create(&path).expect("reopen");
        assert_eq!(
            again.open(&sealed).expect("open"),
            "postgresql://u:hunter2@h/db"
        );
        let other = Sealer::open_or_create(&dir.path().join("other.key")).expect("other");
        assert!(other.open(&sealed).is_err());
        let mode = std::fs::metadata(&path).expect("meta").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
