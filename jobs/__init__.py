"""Thin entry points that wire matcher's pure steps to the lake and to Spark, one module per stage."""
