//! Tandem Fleet's pure run-lifecycle core.
//!
//! Everything here is a function of its inputs: no I/O, no clock, no async runtime. Services load
//! rows, call a transition with the database's `now`, and persist the run together with the
//! returned [`effects::Effects`] in one transaction.

pub mod audit;
pub mod claim;
pub mod config;
pub mod effects;
pub mod execution;
pub mod gate;
pub mod governance;
pub mod graph;
pub mod model;
pub mod operator;
pub mod policy;
pub mod protocol;
pub mod sweeps;

pub use effects::{AuditDraft, Effects, EventDraft, Transition, update};
pub use model::*;
