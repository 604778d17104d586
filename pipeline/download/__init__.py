"""The download stage: fetching images into webdataset tar shards with a status per record.

Submodules are imported where used, so a stage pulls in only what it runs.
"""
