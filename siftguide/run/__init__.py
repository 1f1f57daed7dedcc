"""What a run needs around training, one concept per file: the run directory's lock (:mod:`.lock`), safe checkpoint
loading (:mod:`.checkpoint`), exact resume (:mod:`.resume`), which settings may change on resume (:mod:`.changes`)
and the pre-flight config checks (:mod:`.checks`)."""
