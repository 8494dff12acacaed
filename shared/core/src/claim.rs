//! Claim decision (spec §3.4).
