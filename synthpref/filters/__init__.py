"""Curation filters: stages of kind ``filter`` that drop (or flag) prompts or pairs, and say why.

Pair filters (``margin_filter``, ``consistency_filter``, ``length_bias_filter``,
``reliability_filter``) run after a ``pairs`` stage and remove pairs from ``record.pairs``; records stay
(with their candidates and judgments) so ``records.parquet`` and the pointwise/listwise formats keep
them. A dropped pair is kept, with the stage and reason, in ``record.annotations["dropped_pairs"]``.
Prompt filters (``dedup``, ``decontaminate``) drop whole records; put them first, before generation,
so no model time is spent on prompts that will be thrown away.

Every filter counts what it did in its stage counters (``kept``, ``dropped:<reason>``,
``flagged:<reason>``), which land in the run summary, the run report and the dataset card.
"""
