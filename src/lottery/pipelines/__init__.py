"""Multi-stage jobs over run folders (dense training lives in lottery.experiment; CS here; IMP later)."""
