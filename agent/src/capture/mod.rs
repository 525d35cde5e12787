//! Evidence capture on detection (issue 4): freeze, core file, context,
//! manifest, bundle. Work in progress.
