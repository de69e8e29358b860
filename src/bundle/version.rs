//! Versions of versioned scripts: integers separated by `.` or `_`, compared numerically
//! part by part, so `V1 < V1_1 < V1.2 < V2 < V10`. Trailing zero parts do not count
//! (`V1` and `V1.0` are the same version, as in Flyway), which is also how two scripts
//! with the same version are detected.

use std::fmt;
use std::str::FromStr;

/// A script version, normalised: no trailing zero parts, at least one part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    parts: Vec<u64>,
}

/// Why a version string is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("the version is empty")]
    Empty,
    #[error(
        "version part {part:?} is not a whole number (versions look like 1, 1_1, 2.3 or 20261122_01)"
    )]
    NotANumber { part: String },
    #[error("version part {part:?} is too large")]
    TooLarge { part: String },
}

impl Version {
    /// The numeric parts, without trailing zeros.
    pub fn parts(&self) -> &[u64] {
        &self.parts
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(VersionError::Empty);
        }
        let mut parts = s
            .split(['.', '_'])
            .map(|part| {
                if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(VersionError::NotANumber {
                        part: part.to_string(),
                    });
                }
                part.parse::<u64>().map_err(|_| VersionError::TooLarge {
                    part: part.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        while parts.len() > 1 && parts.last() == Some(&0) {
            parts.pop();
        }
        Ok(Self { parts })
    }
}

/// The canonical form, parts joined by `.`: what the execution log stores.
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{part}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().expect(s)
    }

    #[test]
    fn numeric_part_by_part_ordering() {
        let ordered = ["1", "1_1", "1.2", "2", "10", "20261122_01", "20261122.2"];
        for pair in ordered.windows(2) {
            assert!(v(pair[0]) < v(pair[1]), "{} < {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn separators_and_trailing_zeros_do_not_matter() {
        assert_eq!(v("1_1"), v("1.1"));
        assert_eq!(v("1"), v("1.0"));
        assert_eq!(v("1.0.0"), v("1"));
        assert_eq!(v("01.2"), v("1.2"));
        assert_eq!(v("0").to_string(), "0");
        assert_eq!(v("2_3_0").to_string(), "2.3");
    }

    #[test]
    fn malformed_versions() {
        assert_eq!("".parse::<Version>(), Err(VersionError::Empty));
        for bad in ["1..2", "1_", ".1", "1a", "v1", "1-2", " 1"] {
            assert!(
                matches!(bad.parse::<Version>(), Err(VersionError::NotANumber { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            "99999999999999999999999".parse::<Version>(),
            Err(VersionError::TooLarge { .. })
        ));
    }
}
