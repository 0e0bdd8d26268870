//! The one integration test binary: modules by surface.

mod api;
mod cli;
mod crash;
mod encoding;
mod fuzz;
mod log;
mod model;
mod money;
mod properties;
mod replays;
mod rules;
mod scenarios;
mod store;
mod support;
mod tidy;
mod writer;
