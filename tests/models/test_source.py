import threading
import time

from keel.models.source import _materialise


def test_a_directory_needed_by_two_at_once_is_built_once(tmp_path):
    """Two builders of the same cached directory (two servers starting, two test workers): the second waits for
    the first and reads what it built."""
    builds = []

    def write(directory):
        builds.append(directory)
        time.sleep(0.3)  # long enough that the second arrives while the first still builds
        (directory / "config.json").write_text("{}")

    target = tmp_path / "model"
    results = []
    threads = [threading.Thread(target=lambda: results.append(_materialise(target, write))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and results == [target, target] and (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["model"]  # no temporary sibling left behind
