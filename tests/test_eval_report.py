"""The feature report: a planted latent's top examples are its true argmax rows, with their real contexts;
the page is self-contained and every link resolves (parsed; rendered by headless Chromium where installed)."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from collect_fixtures import _seed_and_offline, docs_jsonl, tiny_llama  # noqa: F401
from eval_support import random_sae
from safetensors.torch import load_file

from saetron.collect.collector import collect
from saetron.collect.config import CollectConfig
from saetron.eval.config import EvalConfig
from saetron.eval.run import run

LAYER, CONTEXT, D_MODEL, D_SAE, EXAMPLES, SIDE = 1, 24, 64, 48, 5, 4
PLANTED, PLANTED_ROW = 7, 100


class Page(HTMLParser):
    """Sections, examples (row, activation, token texts, framed index), links, ids and sources of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.srcs, self.tags = set(), [], [], set()
        self.examples: dict[int, list[dict]] = {}
        self._latent, self._example, self._span = None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if "src" in a:
            self.srcs.append(a["src"])
        if tag == "section" and "data-latent" in a:
            self._latent = int(a["data-latent"])
            self.examples[self._latent] = []
        elif tag == "div" and "data-row" in a:
            self._example = {"row": int(a["data-row"]), "activation": float(a["data-activation"]),
                             "tokens": [], "center": None, "gaps": 0}
            self.examples[self._latent].append(self._example)
        elif tag == "span" and self._example is not None:
            cls = a.get("class", "")
            self._span = cls
            if "center" in cls.split():
                self._example["center"] = len(self._example["tokens"])
            if cls == "gap":
                self._example["gaps"] += 1
            elif cls.startswith("tok"):
                self._example["tokens"].append("")

    def handle_data(self, data):
        if self._example is not None and self._span and self._span.startswith("tok"):
            self._example["tokens"][-1] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "div":
            self._example = None


@pytest.fixture(scope="module")
def report(tiny_llama, docs_jsonl, tmp_path_factory):  # noqa: F811
    """A store of the tiny Llama, an SAE whose latent PLANTED reads one direction, and the report."""
    root = tmp_path_factory.mktemp("report")
    store = str(root / "store")
    collect(CollectConfig(model=tiny_llama, target_layer=LAYER, output_dir=store, dataset=docs_jsonl,
                          context_size=CONTEXT, batch_size=4, max_tokens=400, shard_tokens=150))
    sae = random_sae(D_MODEL, D_SAE, None, normalize="none", seed=5, backend="torch")
    x, _, _ = store_rows(store)
    direction = x[PLANTED_ROW] - x.mean(0)  # the planted latent reads one row's deviation from the mean
    with torch.no_grad():
        sae.W_enc[:, PLANTED] = direction / direction.norm()
        sae.b_enc[PLANTED] = 0.0
    sae.save(root / "sae")
    cfg = EvalConfig(sae=str(root / "sae"), data_dir=store, output_dir=str(root / "out"), report=True,
                     report_top=D_SAE, report_rare=0, report_examples=EXAMPLES, report_context=SIDE)
    result = run(cfg)
    page = Page()
    page.feed((root / "out" / "report" / "index.html").read_text(encoding="utf-8"))
    return result, page, store, sae


def store_rows(store: str):
    """All rows of the store in order: activations, token ids, positions."""
    import json
    import os

    manifest = json.load(open(os.path.join(store, "manifest.json")))
    shards = [load_file(os.path.join(store, s["file"])) for s in manifest["shards"]]
    return (torch.cat([s[k] for s in shards]) for k in ("activations", "token_ids", "positions"))


def test_top_examples_are_the_argmax_rows_with_their_contexts(report, tiny_llama):  # noqa: F811
    from transformers import AutoTokenizer

    result, page, store, sae = report
    x, token_ids, positions = store_rows(store)
    with torch.no_grad():
        f = torch.relu(x @ sae.W_enc + sae.b_enc)  # [N, d_sae]: the SAE's encoder, by hand
    assert set(page.examples) == set(torch.nonzero(f.amax(0) > 0).flatten().tolist())  # every live latent
    assert PLANTED_ROW in [e["row"] for e in page.examples[PLANTED]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    n = len(positions)
    starts = [0] + [i for i in range(1, n) if positions[i] <= positions[i - 1]] + [n]  # window starts
    for latent, shown in page.examples.items():
        column = f[:, latent]
        order = sorted(range(len(column)), key=lambda i: (-float(column[i]), i))[:EXAMPLES]
        order = [i for i in order if column[i] > 0]
        assert [e["row"] for e in shown] == order, latent
        # float32 encoder by hand vs the torch backend: 1e-5 relative
        assert [e["activation"] for e in shown] == pytest.approx([float(column[i]) for i in order], rel=1e-5)
    cut = 0
    for e in (e for shown in page.examples.values() for e in shown):
        row = e["row"]
        lo = max(s for s in starts if s <= row)
        hi = min(s for s in starts if s > row)
        want = list(range(max(lo, row - SIDE), min(hi, row + SIDE + 1)))  # the same window only
        cut += len(want) < 2 * SIDE + 1
        texts = [tokenizer.decode([int(token_ids[i])]).replace("\n", "\u21b5") for i in want]
        assert e["tokens"] == texts and e["center"] == want.index(row)
        assert e["gaps"] == sum(int(positions[i] - positions[i - 1] > 1) for i in want[1:])
    # the cases worth covering occurred: contexts cut at a window's edge, left-out EOS tokens shown
    assert cut > 0 and any(e["gaps"] for shown in page.examples.values() for e in shown)


def test_page_is_self_contained_and_linked(report):
    result, page, _, _ = report
    assert result["report"].endswith("report/index.html")
    latents = set(page.examples)
    assert len(latents) > 10
    internal = [h for h in page.hrefs if h.startswith("#")]
    assert {f"#latent-{j}" for j in latents} <= set(internal)
    assert all(h[1:] in page.ids for h in internal)  # every link lands
    assert len(internal) == len(page.hrefs)  # nothing outside the page
    assert page.srcs and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert "script" not in page.tags and "link" not in page.tags


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium (Debian package chromium)")
def test_chromium_renders_every_section(report, tmp_path):
    result, page, _, _ = report
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"file://{result['report']}"], capture_output=True, text=True, timeout=120).stdout
    rendered = Page()
    rendered.feed(dom)
    assert rendered.examples.keys() == page.examples.keys()
    assert [e["row"] for e in rendered.examples[PLANTED]] == [e["row"] for e in page.examples[PLANTED]]


def test_select_latents_frequent_and_rare():
    from saetron.eval.features import FeatureStats
    from saetron.eval.report import select_latents

    stats = FeatureStats(200)
    stats.counts = torch.arange(200) % 100  # counts 0..99 twice; 0 = dead (latents 0 and 100)
    top, rare = select_latents(stats, n_top=4, n_rare=5, seed=0)
    assert top == [99, 199, 98, 198]  # most frequent first, the lower id on a tie
    # rare: 5 of the rarest tenth (19 of the 194 other live latents; counts 1..10), rarest first, no dead
    assert len(rare) == 5 and all(1 <= int(stats.counts[j]) <= 10 for j in rare)
    assert [int(stats.counts[j]) for j in rare] == sorted(int(stats.counts[j]) for j in rare)
    assert select_latents(stats, 4, 5, seed=0) == (top, rare)  # seeded
    assert select_latents(stats, 4, 5, seed=1)[1] != rare
