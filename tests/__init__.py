"""The test suite: a package, so that tests and scripts import helpers as `tests.helpers.NAME`."""
