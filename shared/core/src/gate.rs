//! Approval gates (spec §4): opening, human decisions, expiry, escalation, reminders, stale
//! marking and recovery of settled decisions.
