"""`together lora --mesh`'s refusals before any stage hears of a job (the ring itself:
tests/mesh/test_train_ring.py)."""

import json
import re
import select
import socket

import pytest

pytest.importorskip("mlx.core")

NOBODY = "127.0.0.1:9"  # nothing listens there: a driver that reached for the ring would say so


def _data(tmp_path, lines):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


class Listener:
    """A port that counts the connections made to it (a peer the driver must not reach)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]

    def connections(self) -> int:
        n = 0
        while select.select([self.sock], [], [], 0.2)[0]:
            self.sock.accept()[0].close()
            n += 1
        self.sock.close()
        return n


def test_bad_data_is_refused_before_the_ring_is_asked(tmp_path, capsys):
    from apps.cli import main

    d = _data(tmp_path, [json.dumps({"text": "a"}), "{oops"])
    peer = Listener()
    assert main(["lora", "--mesh", "m", "--peer", peer.address, "--data", str(d), "--adapter-path",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"train\.jsonl line 2: not valid JSON", err), err
    assert peer.connections() == 0 and not (tmp_path / "o").exists()


def test_dropout_is_refused(tmp_path, capsys):
    from apps.cli import main

    d = _data(tmp_path, [json.dumps({"text": f"Q: {i}\nA: yes"}) for i in range(4)])
    assert main(["lora", "--peer", NOBODY, "--data", str(d), "--dropout", "0.1"]) == 2
    assert "--dropout is not supported with --mesh" in capsys.readouterr().err


@pytest.mark.slow  # it loads the tokenizer and tokenizes the data first (seconds)
def test_a_missing_ring_is_a_clear_error(tmp_path, capsys):
    from apps.cli import main

    d = _data(tmp_path, [json.dumps({"text": f"Q: {i}\nA: yes"}) for i in range(4)])
    assert main(["lora", "--mesh", "m", "--peer", NOBODY, "--data", str(d), "--batch-size", "2", "--settle", "0.1",
                 "--adapter-path", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"no peer of mesh m found ({NOBODY}:" in err and "--peer HOST:PORT" in err, err
    assert not (tmp_path / "o").exists()
