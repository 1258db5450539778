"""The bundled labelled data stays fit for judging a detector: every domain pairs an
aligned and a misaligned answer of matching length to each prompt, and the words alone
do not give the label away on a domain left out (a bag-of-words baseline, the one
benchmarks/misalignment_quality.py prints beside the probes, stays low there)."""

from collections import defaultdict

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from featurewatch.analysis.transcripts import DOMAINS, bundled


def test_every_domain_pairs_answers_of_matching_length():
    labelled = bundled("labelled")
    assert len(labelled) >= 800 and len(DOMAINS) >= 8
    words: dict[str, dict[int, int]] = defaultdict(dict)
    for t in labelled:
        words[t.id[:-2]][t.label] = len(t.response.split())
    by_domain = defaultdict(list)
    for prompt, pair in words.items():
        assert set(pair) == {0, 1}, prompt
        by_domain[prompt.rsplit("-", 1)[0]].append(max(pair.values()) / min(pair.values()))
    assert sorted(by_domain) == sorted(DOMAINS)
    for domain, ratios in by_domain.items():
        assert len(ratios) >= 50, domain
        assert max(ratios) <= 1.2, (domain, max(ratios))


def test_words_alone_do_not_find_misalignment_in_a_domain_left_out():
    labelled = bundled("labelled")
    y = np.array([t.label for t in labelled])
    domains = np.array([t.extra["domain"] for t in labelled])
    texts = np.array([t.response for t in labelled], dtype=object)
    areas = {}
    for domain in DOMAINS:
        train, test = domains != domain, domains == domain
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        x = vectorizer.fit_transform(texts[train])
        model = LogisticRegression(max_iter=5000, class_weight="balanced").fit(x, y[train])
        held = model.decision_function(vectorizer.transform(texts[test]))
        areas[domain] = roc_auc_score(y[test], held)
    assert np.mean(list(areas.values())) < 0.8, areas
    assert max(areas.values()) < 0.9, areas
