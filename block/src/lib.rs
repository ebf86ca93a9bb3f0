//! Copy-on-write disk layers, the dirty-extent journal and the three-way merge.
