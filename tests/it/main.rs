//! The one integration test binary: modules by surface.

mod crash;
mod encoding;
mod log;
mod money;
mod rules;
mod scenarios;
mod support;
mod tidy;
