"""The pipeline's pure steps: functions over DataFrames, Arrow tables, arrays and tensors.

No step reads or writes the lake, starts Spark, or knows how it is distributed; `jobs/` hands steps their batches.
Steps import only `matcher.config`, `matcher.failures` and other steps (tests/test_layering.py holds this).
"""
