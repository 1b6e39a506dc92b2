//! The records: v1 (what existing monitoring reads) and v2 (v1 plus runtime metrics).
//!
//! # Compatibility
//!
//! v2 only adds fields. Every v1 field keeps its name, unit and meaning, so a v1
//! consumer that ignores unknown fields reads a v2 line unchanged; every new field is
//! optional and left out when unknown, so a v2 reader reads a v1 line as a v2 record
//! with the new fields absent ([`Record::into_v2`]).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::badge::StatusBadge;
use crate::error::{Error, Result};

/// An instant in UTC, written as RFC 3339 (`2026-11-23T22:41:07.125Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Self(OffsetDateTime::now_utc())
    }

    /// A timestamp from an instant; it is converted to UTC.
    pub fn from_datetime(t: OffsetDateTime) -> Self {
        Self(t.to_offset(time::UtcOffset::UTC))
    }

    /// The instant.
    pub fn datetime(&self) -> OffsetDateTime {
        self.0
    }
}

impl FromStr for Timestamp {
    type Err = Error;

    /// Parses RFC 3339 text whose offset is UTC (`Z` or `+00:00`).
    fn from_str(s: &str) -> Result<Self> {
        let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| Error::Timestamp {
            value: s.to_owned(),
            reason: e.to_string(),
        })?;
        if !t.offset().is_utc() {
            return Err(Error::Timestamp {
                value: s.to_owned(),
                reason: format!("offset {} is not UTC", t.offset()),
            });
        }
        Ok(Self(t))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.format(&Rfc3339) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(fmt::Error),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let text = self.0.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 date and time in UTC"
        })
    }
}

/// Whether a run succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// The run completed.
    Ok,
    /// The run failed; `error` says why.
    Error,
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunStatus::Ok => "ok",
            RunStatus::Error => "error",
        })
    }
}

/// A schema version this crate reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SchemaVersion {
    /// Version 1.
    V1,
    /// Version 2.
    V2,
}

impl SchemaVersion {
    /// The number written in `schema_version`.
    pub const fn number(self) -> u32 {
        match self {
            SchemaVersion::V1 => 1,
            SchemaVersion::V2 => 2,
        }
    }
}

impl fmt::Display for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

impl FromStr for SchemaVersion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().trim_start_matches(['v', 'V']) {
            "1" => Ok(SchemaVersion::V1),
            "2" => Ok(SchemaVersion::V2),
            other => Err(Error::UnknownVersion(other.parse().unwrap_or(0))),
        }
    }
}

/// A v1 record: one run, as existing monitoring reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RecordV1 {
    /// The schema version of the line: 1 for v1 records, 2 for v2 records (whose v1
    /// fields are exactly these).
    pub schema_version: u32,
    /// When the run ended, RFC 3339 in UTC.
    pub ts: Timestamp,
    /// A unique id of the run.
    pub run_id: String,
    /// The steps of the run joined by `>`, e.g. `image_analysis>summary` or `generate`.
    pub chain: String,
    /// The model that produced the output (the last step's model for a chain).
    pub model_id: String,
    /// `ok` or `error`.
    pub status: RunStatus,
    /// What went wrong, for `status = error`; `null` otherwise.
    pub error: Option<String>,
    /// Wall time of the whole run, in milliseconds.
    pub latency_ms: f64,
    /// Peak resident memory of the process during the run, in bytes.
    pub peak_memory_bytes: u64,
    /// The memory cutline in force, in bytes.
    pub cutline_bytes: u64,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Generated tokens.
    pub tokens_out: u64,
    /// Generated tokens per second of decoding.
    pub tokens_per_s: f64,
}

/// Which model a run used and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Selection {
    /// The model chosen.
    pub model_id: String,
    /// Why it was chosen (for example `explicit`, `cheapest meeting quality floor 80`).
    pub reason: String,
    /// The model that was first chosen and given up for this one, when a fallback was
    /// taken (for example under memory pressure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// The chosen model's quality ("trinity") score, 0 to 100, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trinity_score: Option<f64>,
}

/// How the memory ledger decided on a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AdmissionRecord {
    /// `admitted` (the plan asked for), `degraded` (a cheaper plan) or `refused`.
    pub decision: String,
    /// The plan that ran (`as asked`, `kv_budget=512+sinks`, `max_tokens=64`), or
    /// the plan asked for when refused.
    pub plan: String,
    /// Every plan tried, in order (the one that ran last).
    pub tried: Vec<String>,
    /// Bytes reserved in the ledger by everything else when the run was decided on.
    pub reserved_bytes: u64,
    /// Bytes the run reserved (0 when refused).
    pub run_bytes: u64,
    /// Resident memory the ledger did not explain at that moment.
    pub unaccounted_bytes: u64,
}

/// One step of a chain, with its own timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Stage {
    /// The step's name, e.g. `image_analysis`.
    pub name: String,
    /// The model the step ran, when it ran one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Wall time of the step, in milliseconds.
    pub latency_ms: f64,
    /// Prompt tokens of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u64>,
    /// Generated tokens of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_out: Option<u64>,
}

/// A v2 record: every v1 field, same names and units, plus the runtime's metrics.
/// Every new field is optional and left out when unknown; none is ever a placeholder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RecordV2 {
    /// The v1 fields, at the top level of the JSON object.
    #[serde(flatten)]
    pub base: RecordV1,
    /// Hits over all acquires of the lazy model cache so far, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub lazy_cache_hit_rate: Option<f64>,
    /// Time to re-acquire an already loaded model, in milliseconds (cache hits only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_overhead_ms: Option<f64>,
    /// Time to load the model cold, in milliseconds (cache misses only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<f64>,
    /// Pixels given to the vision model after resizing, summed over images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pixels: Option<u64>,
    /// Pixels of the images as received, summed over images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_pixels: Option<u64>,
    /// Size of the images as received over their re-encoded size (greater than 1
    /// means smaller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_ratio: Option<f64>,
    /// The `max_tokens` the run was given, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u64>,
    /// Bytes held by the run's KV cache at its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_size: Option<u64>,
    /// `SAFE`, `WARN` or `OVER_CUTLINE`, from the measured peak against the cutline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_badge: Option<StatusBadge>,
    /// Health score, 0 to 100 (see the guard's documented formula).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub health_score: Option<f64>,
    /// The peak memory predicted before the run, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_peak_bytes: Option<u64>,
    /// The weights' quantization scheme, e.g. `Q4_1`, `int8`, `F32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant_scheme: Option<String>,
    /// Which model was chosen and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
    /// Time from the request to the first generated token, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// Prompt tokens whose KV came from the prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_hit_tokens: Option<u64>,
    /// Tokens evicted from the KV cache by pruning during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_evicted_tokens: Option<u64>,
    /// Per-step timings of a chain, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<Stage>>,
    /// How the memory ledger decided on the run (refused runs have a record too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<AdmissionRecord>,
    /// Resident memory the ledger did not explain when the run ended, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unaccounted_bytes: Option<u64>,
    /// The replica of a deployment that ran the run (a Ray Serve replica, a
    /// Kubernetes pod), when the runtime was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// The node (machine) the replica ran on, when the runtime was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
}

impl RecordV2 {
    /// A v2 record with the given v1 fields (its `schema_version` is set to 2) and
    /// every new field absent.
    pub fn new(mut base: RecordV1) -> Self {
        base.schema_version = 2;
        Self {
            base,
            lazy_cache_hit_rate: None,
            reload_overhead_ms: None,
            load_ms: None,
            image_pixels: None,
            original_pixels: None,
            compression_ratio: None,
            token_budget: None,
            kv_cache_size: None,
            status_badge: None,
            health_score: None,
            predicted_peak_bytes: None,
            quant_scheme: None,
            selection: None,
            ttft_ms: None,
            prefix_cache_hit_tokens: None,
            kv_evicted_tokens: None,
            stages: None,
            admission: None,
            unaccounted_bytes: None,
            replica_id: None,
            node_id: None,
        }
    }

    /// Checks every field's range: see [`Record::validate`].
    ///
    /// # Errors
    /// [`Error::OutOfRange`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        validate_v1(&self.base)?;
        rate("lazy_cache_hit_rate", self.lazy_cache_hit_rate)?;
        non_negative("reload_overhead_ms", self.reload_overhead_ms)?;
        non_negative("load_ms", self.load_ms)?;
        if let Some(r) = self
            .compression_ratio
            .filter(|r| !(r.is_finite() && *r > 0.0))
        {
            return Err(out_of_range(
                "compression_ratio",
                r,
                "must be finite and > 0",
            ));
        }
        score("health_score", self.health_score)?;
        non_negative("ttft_ms", self.ttft_ms)?;
        score(
            "selection.trinity_score",
            self.selection.as_ref().and_then(|s| s.trinity_score),
        )?;
        for stage in self.stages.iter().flatten() {
            non_negative("stages.latency_ms", Some(stage.latency_ms))?;
        }
        Ok(())
    }
}

/// A record of either version, as read from a log.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A v1 line.
    V1(RecordV1),
    /// A v2 line.
    V2(Box<RecordV2>),
}

impl Record {
    /// Parses one JSON line, choosing the version from its `schema_version`.
    ///
    /// # Errors
    /// [`Error::Malformed`] (with `line` 0: the caller knows the line) when the text
    /// is not a JSON object of either version, [`Error::UnknownVersion`] for a version
    /// other than 1 or 2.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Malformed {
                line: 0,
                reason: e.to_string(),
            })?;
        let version = value
            .get("schema_version")
            .ok_or_else(|| Error::Malformed {
                line: 0,
                reason: "missing field `schema_version`".to_owned(),
            })?
            .as_u64()
            .ok_or_else(|| Error::Malformed {
                line: 0,
                reason: "`schema_version` is not a non-negative integer".to_owned(),
            })?;
        let malformed = |e: serde_json::Error| Error::Malformed {
            line: 0,
            reason: e.to_string(),
        };
        match version {
            1 => Ok(Record::V1(
                serde_json::from_value(value).map_err(malformed)?,
            )),
            2 => Ok(Record::V2(
                serde_json::from_value(value).map_err(malformed)?,
            )),
            other => Err(Error::UnknownVersion(other)),
        }
    }

    /// The record as one line of JSON, without the newline.
    ///
    /// # Errors
    /// [`Error::Serialize`] if serialisation fails (it does not for valid records).
    pub fn to_json(&self) -> Result<String> {
        match self {
            Record::V1(r) => serde_json::to_string(r),
            Record::V2(r) => serde_json::to_string(r),
        }
        .map_err(Error::Serialize)
    }

    /// The version of the line.
    pub fn version(&self) -> SchemaVersion {
        match self {
            Record::V1(_) => SchemaVersion::V1,
            Record::V2(_) => SchemaVersion::V2,
        }
    }

    /// The v1 fields, whatever the version.
    pub fn v1(&self) -> &RecordV1 {
        match self {
            Record::V1(r) => r,
            Record::V2(r) => &r.base,
        }
    }

    /// The record as v2: a v1 record is upgraded with every new field absent and its
    /// v1 fields unchanged (`schema_version` stays 1, saying where it came from).
    pub fn into_v2(self) -> RecordV2 {
        match self {
            Record::V1(base) => {
                let version = base.schema_version;
                let mut up = RecordV2::new(base);
                up.base.schema_version = version;
                up
            }
            Record::V2(r) => *r,
        }
    }

    /// Checks ranges: sizes and counts are non-negative by type; times, latencies and
    /// rates must be finite and non-negative; rates within 0..=1; `health_score` and
    /// `trinity_score` within 0..=100; `compression_ratio` positive; `error` present
    /// when `status` is `error`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        match self {
            Record::V1(r) => validate_v1(r),
            Record::V2(r) => r.validate(),
        }
    }
}

impl From<RecordV2> for Record {
    fn from(r: RecordV2) -> Self {
        Record::V2(Box::new(r))
    }
}

impl From<RecordV1> for Record {
    fn from(r: RecordV1) -> Self {
        Record::V1(r)
    }
}

fn validate_v1(r: &RecordV1) -> Result<()> {
    if !(1..=2).contains(&r.schema_version) {
        return Err(Error::UnknownVersion(u64::from(r.schema_version)));
    }
    non_negative("latency_ms", Some(r.latency_ms))?;
    non_negative("tokens_per_s", Some(r.tokens_per_s))?;
    if r.status == RunStatus::Error && r.error.as_deref().is_none_or(str::is_empty) {
        return Err(Error::OutOfRange {
            field: "error",
            value: "null".to_owned(),
            reason: "must say what went wrong when status is `error`",
        });
    }
    Ok(())
}

fn out_of_range(field: &'static str, value: f64, reason: &'static str) -> Error {
    Error::OutOfRange {
        field,
        value: value.to_string(),
        reason,
    }
}

fn non_negative(field: &'static str, value: Option<f64>) -> Result<()> {
    match value {
        Some(v) if !(v.is_finite() && v >= 0.0) => {
            Err(out_of_range(field, v, "must be finite and >= 0"))
        }
        _ => Ok(()),
    }
}

fn score(field: &'static str, value: Option<f64>) -> Result<()> {
    match value {
        Some(v) if !(v.is_finite() && (0.0..=100.0).contains(&v)) => {
            Err(out_of_range(field, v, "must be within 0..=100"))
        }
        _ => Ok(()),
    }
}

fn rate(field: &'static str, value: Option<f64>) -> Result<()> {
    match value {
        Some(v) if !(v.is_finite() && (0.0..=1.0).contains(&v)) => {
            Err(out_of_range(field, v, "must be within 0..=1"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1() -> RecordV1 {
        RecordV1 {
            schema_version: 1,
            ts: "2026-11-23T22:41:07.125Z".parse().unwrap(),
            run_id: "r1".into(),
            chain: "generate".into(),
            model_id: "smollm2".into(),
            status: RunStatus::Ok,
            error: None,
            latency_ms: 12.5,
            peak_memory_bytes: 1 << 20,
            cutline_bytes: 1 << 30,
            tokens_in: 5,
            tokens_out: 7,
            tokens_per_s: 100.0,
        }
    }

    #[test]
    fn timestamps_must_be_utc_rfc3339() {
        assert!("2026-11-23T22:41:07Z".parse::<Timestamp>().is_ok());
        assert!("2026-11-23T22:41:07+00:00".parse::<Timestamp>().is_ok());
        let err = "2026-11-23T22:41:07+09:00"
            .parse::<Timestamp>()
            .unwrap_err();
        assert!(err.to_string().contains("not UTC"), "{err}");
        assert!("yesterday".parse::<Timestamp>().is_err());
        let t: Timestamp = "2026-11-23T22:41:07.125Z".parse().unwrap();
        assert_eq!(t.to_string(), "2026-11-23T22:41:07.125Z");
    }

    #[test]
    fn v2_serialises_flat_and_leaves_unknowns_out() {
        let mut r = RecordV2::new(v1());
        r.ttft_ms = Some(3.0);
        let json = Record::from(r).to_json().unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["schema_version"], 2);
        assert_eq!(value["latency_ms"], 12.5);
        assert_eq!(value["ttft_ms"], 3.0);
        assert!(value.get("health_score").is_none());
        assert!(value.get("base").is_none());
        assert!(value.get("replica_id").is_none());
        assert!(value.get("node_id").is_none());
    }

    #[test]
    fn replica_and_node_ids_round_trip_and_old_lines_lack_them() {
        let mut r = RecordV2::new(v1());
        r.replica_id = Some("replica-2".into());
        r.node_id = Some("node-a".into());
        let json = Record::from(r.clone()).to_json().unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["replica_id"], "replica-2");
        assert_eq!(value["node_id"], "node-a");
        assert_eq!(Record::from_json(&json).unwrap(), Record::from(r));
        // A v2 line written before the fields existed still reads, without them.
        let mut old = serde_json::to_value(v1()).unwrap();
        old["schema_version"] = 2.into();
        let Record::V2(read) = Record::from_json(&old.to_string()).unwrap() else {
            panic!("v2 expected")
        };
        assert_eq!(read.replica_id, None);
        assert_eq!(read.node_id, None);
    }

    #[test]
    fn ranges_are_checked() {
        let mut r = RecordV2::new(v1());
        r.health_score = Some(101.0);
        let err = r.validate().unwrap_err();
        assert!(err.to_string().contains("health_score"), "{err}");
        r.health_score = Some(100.0);
        r.lazy_cache_hit_rate = Some(1.5);
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("lazy_cache_hit_rate")
        );
        r.lazy_cache_hit_rate = Some(0.5);
        r.base.latency_ms = f64::NAN;
        assert!(r.validate().unwrap_err().to_string().contains("latency_ms"));
        r.base.latency_ms = 1.0;
        r.base.status = RunStatus::Error;
        assert!(r.validate().unwrap_err().to_string().contains("error"));
        r.base.error = Some("boom".into());
        r.validate().unwrap();
    }

    #[test]
    fn unknown_versions_are_rejected() {
        let mut v = serde_json::to_value(v1()).unwrap();
        v["schema_version"] = 3.into();
        let err = Record::from_json(&v.to_string()).unwrap_err();
        assert!(matches!(err, Error::UnknownVersion(3)));
    }

    #[test]
    fn upgrade_keeps_v1_fields() {
        let up = Record::V1(v1()).into_v2();
        assert_eq!(up.base, v1());
        assert_eq!(up.ttft_ms, None);
    }
}
