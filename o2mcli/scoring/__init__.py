"""Scoring: feature extractors (shipped digits classifier, clean-fid's Inception), FID/KID via clean-fid, CLIP score,
reports.

Modules: ``classifier`` (the digits CNN and its training recipe), ``features`` (the extractor
registry), ``metrics`` (FID/KID from features), ``clip`` (CLIP score from local CLIP weights),
``report`` (Table-1-style Markdown).
The ``o2m score`` stage that uses them is ``o2mcli.stages.score``.
"""
