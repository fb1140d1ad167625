use std::fmt;
use std::time::Duration;

/// Why a name or duration given by an operator was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is too long (at most 64 characters)")]
    TooLong { kind: &'static str, name: String },
    #[error(
        "{kind} name {name:?} may only hold letters, digits, '-', '_' and '.', and must not start with '.' or '-'"
    )]
    BadChar { kind: &'static str, name: String },
    #[error("interval {0:?} is not a duration such as 30s, 15m, 1h or 1d")]
    BadInterval(String),
}

/// A name that is safe to use as a file name, a QEMU id and a database key.
fn check(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > 64 {
        return Err(NameError::TooLong { kind, name: name.into() });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !name.chars().all(ok_char) || name.starts_with('.') || name.starts_with('-') {
        return Err(NameError::BadChar { kind, name: name.into() });
    }
    Ok(())
}

macro_rules! name_type {
    ($ty:ident, $kind:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(String);

        impl $ty {
            pub fn new(name: &str) -> Result<Self, NameError> {
                check($kind, name)?;
                Ok(Self(name.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(VmName, "VM");

/// Parses an operator's interval: a number followed by s, m, h or d.
pub fn parse_interval(text: &str) -> Result<Duration, NameError> {
    let bad = || NameError::BadInterval(text.to_owned());
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(bad()),
    };
    if secs == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(VmName::new("web-01_a.b").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(VmName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_interval("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_interval("1d"), Ok(Duration::from_secs(86400)));
        for bad in ["", "0s", "5", "m", "5w", "-5m", "1.5h"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} accepted");
        }
    }
}
