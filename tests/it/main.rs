//! Integration tests: the real daemon on an ephemeral loopback port, real signed HTTP
//! requests, a real SQLite file. One binary, one module per capability.

#[macro_use]
mod harness;
mod postgres;

mod browser;
mod cli;
mod conformance;
mod dedupe;
mod delivery;
mod deploy;
mod durability;
mod edge;
mod email;
mod enrich;
mod grouping;
mod hostile;
mod hostile_again;
mod layout;
mod logs;
mod loud;
mod metrics;
mod quiet;
mod reconcile;
mod recorder;
mod replicas;
mod routing;
mod signatures;
mod status;
mod web;
