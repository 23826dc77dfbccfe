import os
from pathlib import Path

import pytest
import torch

# One torch thread per process: on 2 shared cores a second thread is slower (the Ray actors the tests
# start compete for the same cores), and the quality figures asserted below were measured so.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same in the processes the tests start

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """Unless the caller chose one, caches (worlds, key statistics) live in a fresh folder."""
    if "LME_SIM_CACHE" not in os.environ:
        os.environ["LME_SIM_CACHE"] = str(tmp_path_factory.mktemp("lme_cache"))
    if "LME_SIM_DATA" not in os.environ and SHARED_DATA.is_dir():
        # named datasets (counterfact-edit, counterfact-train, ...): this project's copies, the same
        # bytes as their public sources (lme_sim.catalog checks the sha256), never downloaded here
        os.environ["LME_SIM_DATA"] = str(SHARED_DATA)
    yield


@pytest.fixture(scope="session")
def small_world():
    """(model, tokenizer, world) of the small test world; trained once per session (~5-10 s)."""
    from lme_sim.world_model import load_world_model

    return load_world_model("small", progress=False)


@pytest.fixture
def fresh_small_world(small_world):
    """A private copy of the small world model, safe to edit."""
    import copy

    model, tok, world = small_world
    return copy.deepcopy(model), tok, world


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def ray_session(small_world):
    """One local Ray for the session (starting it costs ~10 s); shut down at the end."""
    from lme_sim.runtime.ray_utils import init_ray

    ray = init_ray(object_store_mb=128)
    yield ray
    ray.shutdown()
