//! JSON Schema of the records, derived from the types.

use crate::record::{RecordV1, RecordV2, SchemaVersion};

/// The JSON Schema of one record version, as pretty-printed JSON ending in a newline:
/// exactly the text committed under `docs/schema/`.
///
/// ```
/// let schema = afo_ssot::json_schema(afo_ssot::SchemaVersion::V2);
/// assert!(schema.contains("\"ttft_ms\""));
/// ```
pub fn json_schema(version: SchemaVersion) -> String {
    let schema = match version {
        SchemaVersion::V1 => schemars::schema_for!(RecordV1),
        SchemaVersion::V2 => schemars::schema_for!(RecordV2),
    };
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
