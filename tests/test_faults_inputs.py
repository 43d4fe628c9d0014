"""Faults in what a recipe reads (issue 30, items 6 and 8).

Item 6: a `copy_file` fix-up could copy the user's Hub token into the checkpoint, and publish uploaded it.
Every escape form is tried at load (where the path is known), again when the fix-up runs (a link made in
between), and at publish, where a loopback fake Hub (runner/testing/fake_hub.py, the real huggingface_hub
client talking to it) shows that nothing secret reaches the Hub. HOME is a temporary folder: the real
~/.cache is never touched. Tokens and keys are built at run time, so this file holds none.

Item 8: recipe loading bounds document size, alias expansion and nesting: a 1.5 KB "billion laughs" file
ran 28 s and ended in MemoryError, a recursive alias and 3,000 nested brackets ended in RecursionError, and
50,000 nested brackets crashed the process (libyaml's composer, SIGSEGV).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DEMO, recipe
from runner.errors import RecipeError, RunnerError
from runner.recipe.fixups import apply_fixups
from runner.recipe.loader import load_recipe
from runner.recipe.secrets import secret_file
from runner.recipe.yaml_tree import MAX_BYTES, MAX_DEPTH, MAX_VALUES, read_yaml, to_plain
from runner.steps.publish import stage, upload
from runner.testing.fake_hub import FakeHub

TOKEN = "hf_" + "Canary0" * 6  # shaped like a Hugging Face token
PUBLISH_TOKEN = "hf_" + "Publish" * 6  # the one the upload itself is allowed to send, in its header only
PRIVATE_KEY = "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A HOME with a Hugging Face login (token file) in it; the recipes live in tmp_path/recipes."""
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(TOKEN)
    monkeypatch.setenv("HOME", str(home))
    for name in ("HF_HOME", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "recipes").mkdir()
    return home


def copy_recipe(folder: Path, source: str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(f"extends: {DEMO}\nexport:\n  fixups:\n    - {{op: copy_file, source: '{source}', to: notes.txt}}\n",
                    encoding="utf-8")
    return path


def refused_at_load(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, env=env)
    text = str(caught.value)
    assert f"{path}:4:" in text and "export.fixups[0].source" in text, text  # file:line, key
    assert TOKEN not in text and "PRIVATE KEY-----\nb3" not in text  # the reason never quotes the secret
    return text


# --- item 6: at load -------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["~/.cache/huggingface/token", "${env:HOME}/.cache/huggingface/token",
                                    "../home/.cache/huggingface/token", "ABSOLUTE"])
def test_copy_file_sources_outside_the_recipes_folder_are_refused_at_load(home, tmp_path, source):
    source = source.replace("ABSOLUTE", str(home / ".cache" / "huggingface" / "token"))
    text = refused_at_load(copy_recipe(tmp_path / "recipes", source), env={"HOME": str(home)})
    assert "must be a path inside the folder of the recipe" in text and "model:NAME" in text  # the fix


def test_a_path_from_vars_is_refused_like_one_written_in_place(home, tmp_path):
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(f"extends: {DEMO}\nvars:\n  t: ~/.cache/huggingface/token\nexport:\n  fixups:\n"
                    "    - {op: copy_file, source: '${t}', to: notes.txt}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"export.fixups\[0\].source[\s\S]*must be a path inside the folder"):
        load_recipe(path)


def test_a_linked_folder_beside_the_recipe_is_refused_at_load_even_before_its_file_exists(home, tmp_path):
    recipes = tmp_path / "recipes"
    (recipes / "templates").symlink_to(home / ".cache")  # a folder link out; the file it would hold is not there
    text = refused_at_load(copy_recipe(recipes, "templates/not_yet.jinja"))
    assert "outside" in text and "copy the file in instead of linking" in text


def test_a_file_named_token_is_judged_by_its_content_unless_it_is_the_hugging_face_login(home, tmp_path):
    # Only the login's own file (directly in HF_HOME, ~/.cache/huggingface by default) is refused by its
    # name; a `token` file elsewhere, even below a folder called huggingface, is read when it holds no token.
    recipes = tmp_path / "huggingface" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "token").write_text("<|endoftext|>\n")
    assert load_recipe(copy_recipe(recipes, "token")).recipe.export.fixups[0].source == str(recipes / "token")
    (recipes / "token").write_text(TOKEN)
    assert "holds a Hugging Face token" in refused_at_load(copy_recipe(recipes, "token"))


def test_a_link_beside_the_recipe_that_points_out_is_refused_at_load(home, tmp_path):
    recipes = tmp_path / "recipes"
    (recipes / "chat_template.jinja").symlink_to(tmp_path / "elsewhere.jinja")
    (tmp_path / "elsewhere.jinja").write_text("{{ messages }}")  # harmless, but outside
    text = refused_at_load(copy_recipe(recipes, "chat_template.jinja"))
    assert "outside" in text and "copy the file in instead of linking" in text


@pytest.mark.parametrize("name, content, why", [
    ("chat_template.jinja", "LINK", "Hugging Face login's token file"),  # a link to the token file
    ("notes.txt", f"my login: {TOKEN}\n", "holds a Hugging Face token"),
    ("key.pem", PRIVATE_KEY, "holds a private key"),
    ("id_ed25519", "anything", "ssh private key"),
    (".netrc", "machine huggingface.co login me password x", "credentials file"),
    (".git-credentials", "https://me:x@github.com", "credentials file"),
    (".env", "A=1", "credentials file"),
    (".cache/huggingface/token", TOKEN, "Hugging Face login's token file"),
])
def test_secret_files_beside_the_recipe_are_refused_by_name_and_content(home, name, content, why):
    # The recipe lives in HOME: everything below is "inside the recipe's folder", so only the secret
    # rules stand between these files and the checkpoint.
    path = home / name
    if content == "LINK":
        path.symlink_to(home / ".cache" / "huggingface" / "token")
    elif not path.exists():
        path.write_text(content)
    text = refused_at_load(copy_recipe(home, name))
    assert why in text and "a secret must never reach a checkpoint or the Hub" in text, text


def test_an_ordinary_file_beside_the_recipe_still_loads(home, tmp_path):
    recipes = tmp_path / "recipes"
    (recipes / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    loaded = load_recipe(copy_recipe(recipes, "chat_template.jinja"))
    assert loaded.recipe.export.fixups[0].source == str(recipes / "chat_template.jinja")


# --- item 6: when the fix-up runs ---------------------------------------------------------------------

def test_a_link_made_after_validation_is_refused_when_the_fixup_runs(home, tmp_path):
    recipes = tmp_path / "recipes"
    template = recipes / "chat_template.jinja"
    template.write_text("{{ messages }}")
    fixups = load_recipe(copy_recipe(recipes, "chat_template.jinja")).recipe.export.fixups
    template.unlink()
    template.symlink_to(home / ".cache" / "huggingface" / "token")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(RunnerError, match=r"export.fixups\[0\] \(copy_file\): .* is refused: it resolves to .*outside"):
        apply_fixups(ckpt, fixups, model_dir=None)
    assert not (ckpt / "notes.txt").exists()


def test_a_folder_replaced_by_a_link_after_validation_is_refused_when_the_fixup_runs(home, tmp_path):
    recipes = tmp_path / "recipes"
    (recipes / "templates").mkdir()
    (recipes / "templates" / "token").write_text("{{ messages }}")
    fixups = load_recipe(copy_recipe(recipes, "templates/token")).recipe.export.fixups
    (recipes / "templates" / "token").unlink()
    (recipes / "templates").rmdir()
    (recipes / "templates").symlink_to(home / ".cache" / "huggingface")  # templates/token: the login's token
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(RunnerError, match=r"export.fixups\[0\] \(copy_file\): .* is refused: its folder now resolves"):
        apply_fixups(ckpt, fixups, model_dir=None)
    assert not (ckpt / "notes.txt").exists()


def test_model_files_that_link_out_or_hold_a_secret_are_refused_when_the_fixup_runs(home, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "chat_template.jinja").symlink_to(home / ".cache" / "huggingface" / "token")
    (model / "notes.txt").write_text(f"token={TOKEN}")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(RunnerError, match=r"model:chat_template.jinja is refused: it resolves to .* outside"):
        apply_fixups(ckpt, [{"op": "copy_file", "source": "model:chat_template.jinja", "to": "t.jinja"}], model)
    with pytest.raises(RunnerError, match=r"model:notes.txt is refused: it holds a Hugging Face token"):
        apply_fixups(ckpt, [{"op": "copy_file", "source": "model:notes.txt", "to": "n.txt"}], model)
    assert list(ckpt.iterdir()) == []


def test_a_model_in_the_hugging_face_cache_links_to_its_blobs_and_is_still_read(home, tmp_path):
    repo = tmp_path / "hub" / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0a1b2c").write_text('{"tokenizer_class": "X"}')
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").symlink_to("../../blobs/0a1b2c")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    apply_fixups(ckpt, [{"op": "copy_file", "source": "model:tokenizer_config.json", "to": "tokenizer_config.json"}],
                 snapshot)
    assert json.loads((ckpt / "tokenizer_config.json").read_text()) == {"tokenizer_class": "X"}


# --- item 6: publish ----------------------------------------------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    hub = FakeHub()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(hub.start(), loop).result(timeout=10)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # HfApi reads it when made
    # No user-agent probe: the fake Hub answers /api/agent-harnesses with a list where huggingface_hub 1.x
    # expects a mapping (and the client reads the setting when it is imported, so the constant is set).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_TOKEN", PUBLISH_TOKEN)
    yield hub
    asyncio.run_coroutine_threadsafe(hub.stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)


def publish_as_the_step_does(tmp_path: Path, checkpoint: Path) -> None:
    """What the publish step does (runner/steps/publish.py): stage, then upload what was staged."""
    path = tmp_path / "recipes" / "publish.yaml"
    path.write_text(f"extends: {DEMO}\npublish: {{repo_id: tester/m-NVFP4, dry_run: false}}\n")
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    (report / "README.md").write_text("# card\n")
    target = tmp_path / "upload"
    stage(checkpoint, report, "name: demo\n", target)
    upload(load_recipe(path).recipe, target, "test")


def make_checkpoint(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = json.dumps({"w": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}).encode()
    (root / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + os.urandom(64))
    return root


@pytest.mark.parametrize("poison", ["content", "link_to_token", "link_out", "safetensors_metadata"])
def test_publish_uploads_nothing_when_the_checkpoint_carries_a_secret(home, tmp_path, fake_hub, poison):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    if poison == "content":
        (ckpt / "notes.txt").write_text(f"login {TOKEN}")
    elif poison == "link_to_token":
        (ckpt / "chat_template.jinja").symlink_to(home / ".cache" / "huggingface" / "token")
    elif poison == "link_out":
        (tmp_path / "outside.txt").write_text("not the checkpoint's")
        (ckpt / "extra.txt").symlink_to(tmp_path / "outside.txt")
    else:
        header = json.dumps({"__metadata__": {"note": TOKEN},
                             "w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}).encode()
        (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(RunnerError, match=r"publish: .* is not uploaded: .*Nothing was uploaded"):
        publish_as_the_step_does(tmp_path, ckpt)
    assert fake_hub.calls == [] and fake_hub.uploaded == {}


def test_publish_refuses_a_secret_that_a_fixup_put_into_the_checkpoint(home, tmp_path, fake_hub):
    # The loader refuses token-shaped values in a recipe; fix-ups given as mappings (a step's own inputs)
    # are not loaded from a recipe, so the publish step is the last guard.
    ckpt = make_checkpoint(tmp_path / "ckpt")
    apply_fixups(ckpt, [{"op": "write_json", "file": "auth.json", "content": {"note": TOKEN}}], None)
    with pytest.raises(RunnerError, match=r"publish: .*auth.json is not uploaded: it holds a Hugging Face token"):
        publish_as_the_step_does(tmp_path, ckpt)
    assert fake_hub.calls == [] and fake_hub.uploaded == {}


@pytest.mark.parametrize("poison", ["link_to_netrc", "content"])
def test_publish_refuses_a_data_file_of_the_recipe_that_is_a_secret(home, tmp_path, poison):
    # Calibration sets, prompt files and suites are staged beside recipe.yaml (portable_recipe): a link
    # to a credentials file, or a token inside, never reaches the upload folder's file list.
    (home / ".netrc").write_text("machine huggingface.co login me password hunter2\n")
    data = tmp_path / "calibration.jsonl"
    if poison == "link_to_netrc":
        data.symlink_to(home / ".netrc")
    else:
        data.write_text(json.dumps({"messages": [{"role": "user", "content": f"my token is {TOKEN}"}]}) + "\n")
    report = tmp_path / "report"
    report.mkdir()
    with pytest.raises(RunnerError, match=r"publish: .* is not uploaded: .*(\.netrc is a credentials file|holds a "
                       r"Hugging Face token).*Nothing was uploaded"):
        stage(make_checkpoint(tmp_path / "ckpt"), report, "name: demo\n", tmp_path / "upload",
              {"calibration.jsonl": data})


def test_publish_of_a_clean_checkpoint_reaches_the_fake_hub_and_no_secret_does(home, tmp_path, fake_hub):
    publish_as_the_step_does(tmp_path, make_checkpoint(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "README.md", "recipe.yaml"} <= set(fake_hub.uploaded)
    assert all(TOKEN.encode() not in blob for blob in fake_hub.uploaded.values())
    assert all(c["authorization"] == f"Bearer {PUBLISH_TOKEN}" for c in fake_hub.calls)


def test_the_content_scan_reads_weights_by_their_header_and_finds_no_token_in_random_data(tmp_path, monkeypatch):
    from runner.recipe import secrets

    weights = make_checkpoint(tmp_path / "ckpt") / "model.safetensors"
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(8 << 20))
    assert secret_file(weights) is None and secret_file(noise) is None
    monkeypatch.setattr(secrets, "_CHUNK", 4096)
    embedded = tmp_path / "blob.bin"  # a token across the scan's chunk boundary is still found
    embedded.write_bytes(bytes(4096 - 10) + b" " + TOKEN.encode() + b" ")
    assert secret_file(embedded) == "it holds a Hugging Face token"
    glued = tmp_path / "glued.txt"  # no word boundary: not a token, as for values in a recipe
    glued.write_text("x" + TOKEN)
    assert secret_file(glued) is None


# --- item 8: document size, aliases, nesting -------------------------------------------------------

def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_fast_naming_the_file_and_the_limit(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size < 1600
    start = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert time.perf_counter() - start < 2
    [problem] = caught.value.problems
    assert problem.location.file == str(path) and problem.location.line == 6  # f: the first value over the limit
    assert f"more than {MAX_VALUES:,} values" in problem.message and "billion laughs" in problem.hint
    # As a user runs it: one located line and its hint, exit 2 (bad input), no MemoryError or traceback.
    start = time.perf_counter()
    result = recipe("validate", str(path), timeout=60)
    assert time.perf_counter() - start < 10  # a fresh interpreter; the bomb ran 28 s before the bound
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    output = result.stdout + result.stderr
    assert f"{path}:6:4: this value holds more than {MAX_VALUES:,} values" in output
    assert "Traceback" not in output and "MemoryError" not in output


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: x\nvars: &v\n  a: *v\n")
    [problem] = pytest.raises(RecipeError, read_yaml, path).value.problems
    assert "refers to the collection that holds it" in problem.message and problem.location.line == 2


@pytest.mark.parametrize("depth", [3_000, 50_000])
def test_deep_nesting_is_refused_with_one_line_not_a_crash(tmp_path, depth):
    path = tmp_path / "deep.yaml"
    path.write_text("name: x\nl: " + "[" * depth + "]" * depth + "\n")
    result = recipe("validate", str(path), timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])  # was RecursionError / SIGSEGV
    assert f"values nest more than {MAX_DEPTH} deep" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\ndescription: '" + "x" * MAX_BYTES + "'\n")
    start = time.perf_counter()
    [problem] = pytest.raises(RecipeError, read_yaml, path).value.problems
    assert time.perf_counter() - start < 1
    assert problem.location.file == str(path) and f"larger than {MAX_BYTES >> 20} MiB" in problem.message
    path.write_bytes(b"name: \xff\xfe\n")
    [problem] = pytest.raises(RecipeError, read_yaml, path).value.problems
    assert "not UTF-8" in problem.message


def test_a_file_of_too_many_values_is_refused_before_it_is_built(tmp_path):
    # Under the size limit, but a million values as written: building them took 18 s and 1.3 GB.
    path = tmp_path / "flat.yaml"
    path.write_text("name: x\nl: [" + ",".join(["0"] * (MAX_BYTES // 2 - 100)) + "]\n")
    assert path.stat().st_size <= MAX_BYTES
    start = time.perf_counter()
    [problem] = pytest.raises(RecipeError, read_yaml, path).value.problems
    assert time.perf_counter() - start < 2
    assert problem.location.file == str(path) and problem.location.line == 2
    assert f"holds more than {MAX_VALUES:,} values" in problem.message


def test_anchors_aliases_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"""\
extends: {DEMO}
vars:
  keep: &keep ["*layers.0.*", "*layers.29.*"]
  max: &max {{preset: NVFP4_DEFAULT_CFG, description: every Linear in NVFP4}}
quantization:
  exclude: *keep
  strategies:
    - name: nvfp4_max
      <<: *max
    - name: nvfp4_max_lm_head
      <<: *max
      exclude: ["*lm_head*"]
""")
    recipe_ = load_recipe(path).recipe
    strategies = {s.name: s for s in recipe_.quantization.strategies}
    assert strategies["nvfp4_max_lm_head"].preset == "NVFP4_DEFAULT_CFG"
    assert recipe_.quantization.exclude == ["*layers.0.*", "*layers.29.*"]


def test_the_largest_supported_recipe_fits_the_bounds(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from scale_strategies import recipe_text

    path = tmp_path / "scale.yaml"
    path.write_text(recipe_text(10_000))
    assert path.stat().st_size < MAX_BYTES / 2
    data, _ = to_plain(read_yaml(path))
    assert len(data["quantization"]["strategies"]) == 10_000
