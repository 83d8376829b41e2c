"""Ray Serve on a local 2-CPU Ray: two replicas of a saved model answer 500 concurrent HTTP requests in batches,
each answer equal to the eager module's; bad items and a missing artifact fail with errors naming the problem."""

import concurrent.futures
import shutil

import pytest
import requests
import torch

from torchopt.serve import ray_deployment
from torchopt.serve.ray_serving import replica_failure

pytestmark = pytest.mark.slow

REQUESTS = 500
CLIENTS = 64  # concurrent HTTP clients: enough that both replicas see more requests than one at a time
WAIT_S = 120.0  # failure bound for one request or handle call; never reached when the code works


def _post(url: str, body) -> requests.Response:
    return requests.post(url, json=body, timeout=WAIT_S)


def test_two_replicas_answer_500_concurrent_requests_in_batches(ray_serve, artifact, mlp):
    from ray import serve

    deployment = ray_deployment(artifact, num_replicas=2, num_cpus=0.5, batch_wait_timeout_s=0.02, name="mlp")
    handle = serve.run(deployment.bind(), name="mlp", route_prefix="/mlp")
    try:
        xs = torch.randn(REQUESTS, 16, generator=torch.Generator().manual_seed(3))
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda i: _post(f"{ray_serve}/mlp", xs[i].tolist()), range(REQUESTS)))
        stats = {}  # replica → its stats; the router picks the replica, so ask until both answered (bounded)
        for _ in range(100):
            s = handle.stats.remote().result(timeout_s=WAIT_S)
            stats[s["replica"]] = s
            if len(stats) == 2:
                break
    finally:
        serve.delete("mlp")

    failed = [(i, a.status_code, a.text[:200]) for i, a in enumerate(answers) if a.status_code != 200]
    assert not failed, f"{len(failed)} of {REQUESTS} requests failed, first: {failed[:3]}"
    with torch.no_grad():
        expected = mlp(xs)
    got = torch.tensor([a.json()["outputs"] for a in answers])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    sizes = [a.json()["batch_size"] for a in answers]
    assert max(sizes) > 1, f"every request ran alone (batch sizes {sorted(set(sizes))})"
    assert max(sizes) <= deployment.plan.max_batch_size == 32
    assert len({a.json()["replica"] for a in answers}) == 2, "both replicas must have answered"
    # The replicas' own record: batches of more than one request, and no more requests than were sent.
    assert len(stats) == 2, f"stats came from {list(stats)} only"
    for s in stats.values():
        assert s["warmup_calls"] == 5 and max(s["batch_sizes"]) > 1, s
    per_replica = {r: sum(size * count for size, count in s["batch_sizes"].items()) for r, s in stats.items()}
    assert sum(per_replica.values()) == REQUESTS, f"requests counted by the replicas {per_replica} != {REQUESTS}"


def test_a_bad_item_gets_a_400_naming_the_input_and_the_expected_shape(ray_serve, artifact):
    from ray import serve

    serve.run(ray_deployment(artifact, name="mlp_small").bind(), name="mlp_small", route_prefix="/small")
    try:
        answer = _post(f"{ray_serve}/small", [1.0, 2.0])
        good = _post(f"{ray_serve}/small", [0.5] * 16)
    finally:
        serve.delete("mlp_small")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "input 'x'" in error and "(2,)" in error and "(16,)" in error, error
    assert good.status_code == 200 and len(good.json()["outputs"]) == 4


def test_a_replica_whose_artifact_is_missing_fails_naming_the_file(ray_serve, artifact, tmp_path):
    from ray import serve

    copy = shutil.copytree(artifact, tmp_path / "copy.torchopt")
    deployment = ray_deployment(copy, name="broken", constructor_retries=1)  # the plan reads meta.json here
    (copy / "module.pt2").unlink()  # the replica finds the module file gone
    try:
        with pytest.raises(RuntimeError, match="broken") as failed:
            serve.run(deployment.bind(), name="broken", route_prefix="/broken")
        message = replica_failure("broken")
    finally:
        serve.delete("broken")
    assert "Failed to update the deployments ['broken']" in str(failed.value)
    assert message.startswith("torchopt.saving.DamagedSaveError:"), message
    assert f"{str(copy)!r} is damaged: module.pt2 is missing" in message, message
