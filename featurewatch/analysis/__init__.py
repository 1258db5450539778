"""Analysis without Ray: prompt sets and the corpus, transcripts, pooled features of
transcripts, feature discovery and probes, misalignment scoring.

May import: capture/, sae/, proto/, storage/, config, errors. Never ray, actors/ or platform/.
"""
