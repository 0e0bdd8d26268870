//! The one integration test binary: modules by surface.

mod encoding;
mod log;
mod money;
mod scenarios;
mod support;
