//! One module per subcommand family.

pub(crate) mod bench;
pub(crate) mod eval;
pub(crate) mod generate;
pub(crate) mod inspect;
pub(crate) mod schema;
pub(crate) mod ssot;
