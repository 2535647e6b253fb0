"""Stable partition of a mask (true positions first): the compaction of every backend."""
