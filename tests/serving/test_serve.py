"""The Ray Serve app on CPU with the tiny model: 2 replicas, concurrent HTTP, batching, the Redis cache."""

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import EXAMPLES, ROOT, small_request
from oracle import assert_matches_reference
from PIL import Image
from redis_server import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from qie.core.load_options import LoadOptions  # noqa: E402
from qie.serving.service import ServeSettings, build_app, deployment_options, error_status, request_from_fields  # noqa: E402

PHOTO = (EXAMPLES / "coffee-cup.jpg").read_bytes()
FIELDS = {"prompt": "replace the background with white", "steps": 3, "max_side": 128, "condition_area": "output"}


@pytest.fixture(scope="module")
def service(tiny_dir, redis_url):
    port = free_port()
    env = {k: os.environ[k] for k in ("QIE_CACHE", "HF_HUB_OFFLINE")} | {"PYTHONPATH": str(ROOT)}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(
            load=LoadOptions(model="tiny"),
            cache=redis_url,
            replicas=2,
            max_batch_size=4,
            batch_wait_timeout_s=1.0,  # long enough for concurrent requests to meet in the queue
            max_ongoing_requests=3,
            cpus_per_replica=1,
        )
        serve.run(build_app(settings), name="qie", route_prefix="/")
        yield f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url, body, content_type="application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def post_json(url, **fields):
    body = {"images": [base64.b64encode(PHOTO).decode()], **FIELDS, **fields}
    return post(url, json.dumps(body).encode())


@pytest.mark.slow  # Ray Serve with two replicas
def test_concurrent_requests_two_replicas_batched(service, tiny_editor):
    start = time.perf_counter()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda seed: post_json(service, seed=seed), range(10, 16)))
    elapsed = time.perf_counter() - start
    assert [status for status, _, _ in answers] == [200] * 6, [a[2][:300] for a in answers]
    replicas = {headers["x-qie-replica"] for _, headers, _ in answers}
    batches = [int(headers["x-qie-batch-size"]) for _, headers, _ in answers]
    assert len(replicas) == 2, replicas
    assert max(batches) >= 2 and max(batches) <= 4, batches
    assert {headers["x-qie-cache"] for _, headers, _ in answers} == {"miss"}
    # Through HTTP and a batch, each image is the one a single local edit gives (same tiny weights).
    _, headers, png = answers[0]
    image = Image.open(io.BytesIO(png))
    assert image.size == (128, 96) and headers["x-qie-seed"] == "10"
    local = tiny_editor.edit(small_request(Image.open(io.BytesIO(PHOTO)).convert("RGB"), seed=10)).image
    assert_matches_reference("batching", image.convert("RGB"), local)
    print(f"6 concurrent edits in {elapsed:.1f}s, batch sizes {batches}")


@pytest.mark.slow  # Ray Serve with two replicas
def test_repeat_hits_shared_redis_cache(service, redis_url):
    status, first, png = post_json(service, seed=99)
    assert status == 200 and first["x-qie-cache"] == "miss"
    status, again, png_again = post_json(service, seed=99)
    assert status == 200 and again["x-qie-cache"] == "hit"
    assert png_again == png
    import redis

    assert any(redis.Redis.from_url(redis_url).scan_iter("qie:result:*"))


@pytest.mark.slow  # Ray Serve with two replicas
def test_multipart_and_errors(service):
    boundary = "qieboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in FIELDS.items()]
    body = (
        "".join(parts).encode()
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + PHOTO
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, headers, png = post(service, body, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and headers["content-type"] == "image/png", png[:300]

    status, _, body = post_json(service, steps=1)
    assert status == 400
    error = json.loads(body)
    assert error["param"] == "steps" and "steps=1 is not valid" in error["message"]
    status, _, body = post_json(service, options={"step_cache": 0.1})
    assert status == 400, body
    error = json.loads(body)
    assert error["param"] == "options" and "step_cache_threshold=" in error["message"]
    status, _, body = post(service, b"{not json")
    assert status == 400 and json.loads(body)["param"] == "body"
    with urllib.request.urlopen(service, timeout=30) as resp:
        assert json.loads(resp.read())["model"] == "tiny"


def test_deployment_options_and_error_mapping():
    from qie import BusyError, InvalidRequestError, ResourceError

    gpu = deployment_options(ServeSettings(), gpus_in_cluster=4)
    assert gpu["num_replicas"] == 4 and gpu["ray_actor_options"]["num_gpus"] == 1
    cpu = deployment_options(ServeSettings(load=LoadOptions(model="tiny")), gpus_in_cluster=0)
    assert cpu["num_replicas"] == 1 and cpu["ray_actor_options"]["num_gpus"] == 0
    auto = deployment_options(ServeSettings(autoscale=True), gpus_in_cluster=8)
    assert auto["num_replicas"] == "auto" and auto["autoscaling_config"]["max_replicas"] == 8
    assert error_status(InvalidRequestError("steps", 1, "x")) == 400
    assert error_status(BusyError("busy")) == 503
    assert error_status(ResourceError("not enough GPU memory")) == 507
    assert error_status(RuntimeError("boom")) == 500
    with pytest.raises(InvalidRequestError, match="unknown field"):
        request_from_fields({"prompt": "x", "stepz": "3"}, [PHOTO])
    with pytest.raises(InvalidRequestError, match="steps='three' is not valid"):
        request_from_fields({"prompt": "x", "steps": "three"}, [PHOTO])
    from_env = ServeSettings.from_env({"QIE_MODEL": "tiny", "QIE_MAX_BATCH_SIZE": "4", "QIE_PLAN": "stream"})
    assert (from_env.max_batch_size, from_env.load.model, from_env.load.plan) == (4, "tiny", "stream")
    given = ServeSettings.from_dict({"model": "tiny", "vram_budget_gib": "12", "replicas": "2"})
    assert (given.load.model, given.load.vram_budget_gib, given.replicas) == ("tiny", 12.0, 2)
    with pytest.raises(InvalidRequestError, match="QIE_PLAN='fast' is not valid"):
        ServeSettings.from_env({"QIE_PLAN": "fast"})
    with pytest.raises(InvalidRequestError, match="^options=.*typed fields.*step_cache='fbcache'") as bad:
        request_from_fields({"prompt": "x", "options": '{"step_cache": 0.1}'}, [PHOTO])
    assert bad.value.param == "options" and error_status(bad.value) == 400
    loras = ServeSettings.from_env({"QIE_LORAS": "ink.safetensors:0.5, owner/ink-lora"}).load.loras
    assert loras == ("ink.safetensors:0.5", "owner/ink-lora")
    assert ServeSettings.from_dict({"loras": "a.safetensors,b.safetensors:2"}).load.loras == (
        "a.safetensors",
        "b.safetensors:2",
    )
    with pytest.raises(InvalidRequestError, match="^QIE_LORAS='ink.safetensors:50'"):
        ServeSettings.from_env({"QIE_LORAS": "ink.safetensors:50"})
    with pytest.raises(InvalidRequestError, match="cache='memcached://h' is not valid"):
        ServeSettings(cache="memcached://h")
    with pytest.raises(InvalidRequestError, match="max_batch_size=0"):
        ServeSettings.from_dict({"max_batch_size": "0"})


def test_health_check_and_cli_parser(tiny_editor):
    from qie.cli.main import build_parser
    from qie.serving.service import EditDeployment

    replica = object.__new__(EditDeployment.func_or_class)  # the plain class, without Serve
    replica.editor, replica.failures = tiny_editor, 0
    replica.check_health()
    replica.failures = 3
    with pytest.raises(RuntimeError, match="3 edits in a row failed"):
        replica.check_health()
    args = build_parser().parse_args(["serve", "--model", "tiny", "--cache", "redis://h:1/0", "--max-batch-size", "4"])
    assert (args.command, args.model, args.cache, args.max_batch_size) == ("serve", "tiny", "redis://h:1/0", 4)
    args = build_parser().parse_args(["serve", "--model", "tiny-2511", "--lora", "a.safetensors:0.5", "--lora", "o/b"])
    assert (args.model, args.lora) == ("tiny-2511", ["a.safetensors:0.5", "o/b"])
