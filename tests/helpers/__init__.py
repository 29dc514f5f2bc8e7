"""Test helpers: rank tasks the tests run in pools, subprocess helpers, the Bridge golden table's maker."""
