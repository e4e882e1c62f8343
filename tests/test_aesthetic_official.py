"""The aesthetic reward as the paper used it: the real trained LAION head (shipped in the package and
in ``tests/data/``) through the real loading path, and the official scorer's preprocessing bit for bit;
the reward preprocessing keys ``reward.antialias`` / ``reward.max_length`` exist and do what they say."""
import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowmem_nablagfn.config import ConfigError, RewardConfig, load_config, validate
from lowmem_nablagfn.rewards import aesthetic, build_reward

DATA = Path(__file__).resolve().parent / "data"
MD5 = "b1047fd767a00134b8fd6529bf19521a"  # ../shared/weights/README.md
LINEARS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


def images(batch=2, size=512, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", [DATA / aesthetic.HEAD_FILE, aesthetic.DEFAULT_HEAD], ids=["tests", "package"])
def test_the_real_head_ships(path):
    assert hashlib.md5(path.read_bytes()).hexdigest() == MD5


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A reduced CLIP image tower saved as a folder (the real ViT-L/14 is not available offline)."""
    folder = tmp_path_factory.mktemp("clip")
    aesthetic.random_vision("reduced").save_pretrained(folder)
    return folder


def test_default_checkpoint_is_the_real_head_through_the_real_loading_path(backbone):
    reward = build_reward(RewardConfig(name="aesthetic", backbone=str(backbone)))  # no reward.checkpoint
    # independent computation from the raw state dict (saved on CUDA: map_location, weights_only)
    raw = torch.load(DATA / aesthetic.HEAD_FILE, map_location="cpu", weights_only=True)
    assert set(raw) == {f"{n}.{k}" for n in LINEARS for k in ("weight", "bias")}
    for key, value in raw.items():
        assert torch.equal(reward.head.state_dict()[key], value), key
    x = images()
    with torch.no_grad():
        e = reward.vision(pixel_values=reward.transform(x)).image_embeds.double()
        h = e / e.norm(dim=-1, keepdim=True)
        for name in LINEARS:  # dropouts in between, no activation: the head is affine
            h = h @ raw[f"{name}.weight"].double().T + raw[f"{name}.bias"].double()
        got = reward(x, ["", ""])
    torch.testing.assert_close(got.double(), h.squeeze(1), rtol=1e-5, atol=1e-5)
    explicit = build_reward(RewardConfig(name="aesthetic", checkpoint=str(DATA / aesthetic.HEAD_FILE),
                                         backbone=str(backbone)))
    with torch.no_grad():
        assert torch.equal(explicit(x, ["", ""]), got)


def test_aesthetic_default_is_the_official_preprocessing_bit_for_bit():
    """The official scorer: F.interpolate(images, (224, 224), mode="bicubic"), then CLIP's Normalize."""
    from torchvision.transforms import Normalize

    reward = build_reward(RewardConfig(name="aesthetic", checkpoint="random:reduced"))
    official = Normalize([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    for size in (512, 256, 64):
        x = images(2, size, seed=size)
        want = official(F.interpolate(x, (224, 224), mode="bicubic"))
        assert torch.equal(reward.transform(x), want), size
    assert not reward.transform.antialias
    aa = build_reward(RewardConfig(name="aesthetic", checkpoint="random:reduced", antialias=True))
    assert aa.transform.antialias and not torch.equal(aa.transform(x), want)


def test_hpsv2_and_imagereward_keep_antialiasing_and_max_length_is_a_real_key():
    hps = build_reward(RewardConfig(name="hpsv2", checkpoint="random:reduced"))
    ir = build_reward(RewardConfig(name="imagereward", checkpoint="random:reduced"))
    assert hps.transform.antialias and ir.transform.antialias and ir.max_length == 35
    ir512 = build_reward(RewardConfig(name="imagereward", checkpoint="random:reduced", max_length=48,
                                      antialias=False))
    ids, mask = ir512.tokens(["a photo of a cat"], torch.device("cpu"))
    assert ids.shape == (1, 48) and not ir512.transform.antialias


def test_readme_spelling_of_the_keys_loads():
    cfg = validate(load_config("tiny_cpu", ["reward.name=imagereward", "reward.antialias=false",
                                            "reward.max_length=512"]))
    assert cfg.reward.antialias is False and cfg.reward.max_length == 512
    assert load_config("tiny_cpu").reward.antialias is None  # None: each reward's official preprocessing


@pytest.mark.parametrize("overrides,needle", [
    (["reward.name=aesthetic", "reward.max_length=512"], "only used by reward.name=imagereward"),
    (["reward.name=imagereward", "reward.max_length=1000"], "must lie in [1, 512]"),
    (["reward.antialias=true"], "built-in rewards do not resize"),
])
def test_bad_preprocessing_values_are_refused(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny_cpu", overrides))
    assert needle in str(err.value)


def test_the_packaged_head_is_package_data():
    """A non-editable install carries the head: pyproject's package-data names it."""
    import fnmatch
    import tomllib

    import lowmem_nablagfn

    pkg = Path(lowmem_nablagfn.__file__).resolve().parent
    patterns = tomllib.loads((pkg.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["lowmem_nablagfn"]
    rel = aesthetic.DEFAULT_HEAD.relative_to(pkg).as_posix()
    assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel
