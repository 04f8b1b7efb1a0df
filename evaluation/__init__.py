"""Judging generated pictures: prompt adherence from pixels, the embedded model pipeline, benchmarks."""
