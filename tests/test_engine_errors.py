"""Bad input to the Engine: each error names the file, field or value and what to do."""

import json
import os
import shutil

import pytest

from pregated.engine import Engine


def copy_of(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return str(dst)


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_missing_folder_and_files(mixtral_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine(str(tmp_path / "nope"), device="cpu")
    d = copy_of(mixtral_folder, tmp_path)
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer.json does not exist"):
        Engine(d, device="cpu", quiet=True)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(ValueError, match=r"config.json does not exist"):
        Engine(d, device="cpu", quiet=True)


def test_missing_shard(mixtral_folder, tmp_path):
    d = copy_of(mixtral_folder, tmp_path)
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(d, shard))
    with pytest.raises(ValueError, match=rf"{shard} is listed in .*index.json but does not exist"):
        Engine(d, device="cpu", quiet=True)


def test_truncated_and_corrupt_safetensors(mixtral_folder, tmp_path):
    d = copy_of(mixtral_folder, tmp_path)
    shard = os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match="not a valid safetensors file .*truncated or corrupt"):
        Engine(d, device="cpu", quiet=True)
    with open(shard, "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        Engine(d, device="cpu", quiet=True)


def test_tensor_with_wrong_shape(mixtral_folder, tmp_path):
    d = copy_of(mixtral_folder, tmp_path)
    edit_config(d, intermediate_size=50)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\..*' in .* shape \[96, 64\], expected \[100, 64\]: the checkpoint does not match its config.json"):
        Engine(d, device="cpu", quiet=True)


def test_unsupported_model_type(mixtral_folder, tmp_path):
    d = copy_of(mixtral_folder, tmp_path)
    edit_config(d, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama' has no routed experts that pregated can offload"):
        Engine(d, device="cpu", quiet=True)
    edit_config(d, model_type="no_such_model")
    with pytest.raises(ValueError, match="model_type 'no_such_model' is not a model this transformers .* knows"):
        Engine(d, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def engine(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        yield eng


def test_prompt_longer_than_context(engine):
    ctx = engine.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt of {ctx} tokens plus max_new_tokens=8 exceeds the model's context of {ctx} tokens"):
        engine.generate([5] * ctx, max_new_tokens=8)


def test_invalid_sampling_parameters(engine):
    for kw, msg in (({"temperature": -1.0}, "temperature must be >= 0"),
                    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
                    ({"top_k": -2}, "top_k must be a non-negative integer"),
                    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
                    ({"stop": [""]}, "stop must be")):
        with pytest.raises(ValueError, match=msg):
            engine.generate("hello", **kw)


def test_bad_prompts(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate("")
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([])
    with pytest.raises(ValueError, match=r"token id 100000 is not in the vocabulary"):
        engine.generate([1, 100000])
    with pytest.raises(ValueError, match="stream=True takes one prompt"):
        engine.generate(["a", "b"], stream=True)
    with pytest.raises(TypeError, match="a prompt is text"):
        engine.generate(3.5)


def test_expert_memory_below_minimum(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        one = eng.cfg.expert_bytes()
    with pytest.raises(ValueError, match=rf"below the minimum for policy 'pregated': {4 * one} bytes"):
        Engine(mixtral_folder, device="cpu", expert_memory=3 * one, quiet=True)
    with pytest.raises(ValueError, match=rf"below the minimum for policy 'on-demand': {2 * one} bytes"):
        Engine(mixtral_folder, device="cpu", policy="on-demand", expert_memory=one, quiet=True)
    with pytest.raises(ValueError, match="policy 'gpu-only' keeps all 24 experts on the device"):
        Engine(mixtral_folder, device="cpu", policy="gpu-only", expert_memory="1KB", quiet=True)
    with pytest.raises(ValueError, match="unknown policy 'fastest': choose one of gpu-only, on-demand, prefetch-all, pregated"):
        Engine(mixtral_folder, device="cpu", policy="fastest", quiet=True)
    with pytest.raises(ValueError, match="cannot read a byte count"):
        Engine(mixtral_folder, device="cpu", expert_memory="lots", quiet=True)


def test_use_after_close(mixtral_folder):
    eng = Engine(mixtral_folder, device="cpu", quiet=True)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate("hello")
    eng.close()
