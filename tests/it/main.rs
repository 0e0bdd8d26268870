//! The one integration test binary: modules by surface.

mod money;
mod scenarios;
mod support;
