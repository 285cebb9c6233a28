//! Serde support for decibel values that may be infinite (PSNR of identical images), since JSON
//! has no infinity.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Writes a finite value as a JSON number and `+inf`, `-inf` and NaN as the strings `"inf"`,
/// `"-inf"` and `"nan"`. Use as `#[serde(with = "denoise_metrics::serde_db")]` (or
/// `serialize_with = "denoise_metrics::serde_db::serialize"`).
///
/// # Errors
/// Only those of the serializer.
pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    match non_finite_name(*value) {
        Some(name) => serializer.serialize_str(name),
        None => serializer.serialize_f64(*value),
    }
}

/// Reads what [`serialize`] writes: any number, or one of `"inf"`, `"-inf"`, `"nan"`.
///
/// # Errors
/// For any other string or type.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    deserializer.deserialize_any(DbVisitor)
}

/// The [`serialize`] rule as a `serde_json::Value`, for code that builds JSON by hand.
pub fn db_to_json(value: f64) -> serde_json::Value {
    match non_finite_name(value) {
        Some(name) => serde_json::Value::String(name.to_owned()),
        // `from_f64` only refuses non-finite values, which the arm above took.
        None => serde_json::Number::from_f64(value)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
    }
}

fn non_finite_name(value: f64) -> Option<&'static str> {
    if value.is_nan() {
        Some("nan")
    } else if value == f64::INFINITY {
        Some("inf")
    } else if value == f64::NEG_INFINITY {
        Some("-inf")
    } else {
        None
    }
}

struct DbVisitor;

impl Visitor<'_> for DbVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of decibels or one of \"inf\", \"-inf\", \"nan\"")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        match v {
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            "nan" => Ok(f64::NAN),
            _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    struct Db {
        #[serde(with = "super")]
        v: f64,
    }

    #[test]
    fn round_trips_through_json() {
        for (v, text) in [
            (f64::INFINITY, r#"{"v":"inf"}"#),
            (f64::NEG_INFINITY, r#"{"v":"-inf"}"#),
            (31.25, r#"{"v":31.25}"#),
        ] {
            assert_eq!(serde_json::to_string(&Db { v }).unwrap(), text);
            assert_eq!(serde_json::from_str::<Db>(text).unwrap().v, v);
        }
        assert_eq!(
            serde_json::to_string(&Db { v: f64::NAN }).unwrap(),
            r#"{"v":"nan"}"#
        );
        assert!(
            serde_json::from_str::<Db>(r#"{"v":"nan"}"#)
                .unwrap()
                .v
                .is_nan()
        );
        assert_eq!(serde_json::from_str::<Db>(r#"{"v":30}"#).unwrap().v, 30.0);
        let err = serde_json::from_str::<Db>(r#"{"v":"infinity"}"#).unwrap_err();
        assert!(err.to_string().contains("\"inf\""), "{err}");
    }

    #[test]
    fn json_value_helper() {
        assert_eq!(db_to_json(f64::INFINITY), serde_json::json!("inf"));
        assert_eq!(db_to_json(f64::NEG_INFINITY), serde_json::json!("-inf"));
        assert_eq!(db_to_json(f64::NAN), serde_json::json!("nan"));
        assert_eq!(db_to_json(27.5), serde_json::json!(27.5));
    }
}
