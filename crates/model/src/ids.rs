//! The ids standby passes around, each its own type: a restore point's id where a
//! replica's is expected, or a sequence number where an id is, is a compile error.
//! They serialize as the bare numbers they are in the database and in `--json`.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        #[cfg(feature = "sql")]
        impl rusqlite::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        #[cfg(feature = "sql")]
        impl rusqlite::types::FromSql for $name {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                i64::column_result(v).map($name)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Width and padding apply: layer names are `{seq:06}`.
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id!(
    /// A replica: one VM protected by one job.
    ReplicaId
);
id!(
    /// A restore point.
    PointId
);
id!(
    /// A replica's sequence number: each run and each reserved layer takes the next one;
    /// layer files and bitmaps carry it in their names.
    Seq
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_serialize_as_their_numbers() {
        assert_eq!(format!("{:06}", Seq(42)), "000042");
        assert_eq!(ReplicaId(7).to_string(), "7");
        assert_eq!(serde_json::to_string(&PointId(3)).unwrap(), "3");
    }
}
