"""Bulk pseudo-label generation, Ray-free: inputs, inference, outputs, previews.

``pipelines/label.py`` plans the job and ``workers/label.py`` runs one model per actor; everything
they do to an image lives here so it is testable without Ray:

- ``config``: :class:`LabelConfig` (the job's keys),
- ``inputs``: dataset shards or a manifest -> work units -> samples; class checks,
- ``infer``: :class:`Labeller` (decode, size batches, seg / cam masks),
- ``outputs``: mask PNGs with their stats line, stats/failure parts, consistency pass, evaluation,
- ``records``: unit completion records, their sums, the quality report (resume and final pass in O(units)),
- ``previews``: overlays and the contact sheet.
"""
