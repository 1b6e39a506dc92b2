//! One module per subcommand family.

pub(crate) mod schema;
pub(crate) mod ssot;
