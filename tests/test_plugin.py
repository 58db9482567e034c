"""
The twistd plugin is found both in an editable install (this checkout) and
in a regular C{pip install .}: the classic trap is a plugin module that
only one of the two puts on C{twisted.plugins}' path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import TestCase

import tenantedge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tenantedge.__file__)))

_PROBE = (
    "import sys, twisted.plugins\n"
    "from twisted.plugin import getPlugins\n"
    "from twisted.application.service import IServiceMaker\n"
    "m = [p for p in getPlugins(IServiceMaker) if p.tapname == 'tenantedge']\n"
    "assert m, 'tenantedge plugin not found'\n"
    "import tenantedge\n"
    "print(tenantedge.__file__)\n"
)


class PluginTests(TestCase):
    def test_found_here(self) -> None:
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("tenantedge", names)

    def test_twistd_lists_it(self) -> None:
        """C{twistd --help} from this environment lists the plugin."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "--help"], capture_output=True, text=True, cwd="/", timeout=120).stdout
        self.assertIn("tenantedge", out)

    def test_bad_toml_key_through_the_runners(self) -> None:
        """
        twistd and twist both print a bad TOML key as one line naming the
        file and the key (not the whole --help) and exit non-zero.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('alow-suffix = [".test"]\n')
        bindir = os.path.dirname(sys.executable)
        runners = ([os.path.join(bindir, "twistd"), "-n", "tenantedge"], [os.path.join(bindir, "twist"), "tenantedge"])
        for runner in runners:
            done = subprocess.run([*runner, "--config", path], capture_output=True, text=True, cwd="/", timeout=120)
            lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            self.assertNotEqual(done.returncode, 0, runner)
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(path, lines[0])
            self.assertIn("'alow-suffix'", lines[0])

    def test_regular_install(self) -> None:
        """
        A non-editable install (built into a separate directory, run from
        elsewhere) carries C{twisted/plugins/tenantedge_plugin.py} and the
        plugin is found from there.
        """
        target = os.path.abspath(self.mktemp())
        build = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--target", target, ROOT],
            capture_output=True, text=True, timeout=600,
        )
        self.assertEqual(build.returncode, 0, build.stderr)
        self.assertTrue(os.path.exists(os.path.join(target, "twisted", "plugins", "tenantedge_plugin.py")))
        # -S: no site processing, so the editable install's path entry for
        # this checkout is not there; only the target and the dependencies.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, sysconfig.get_paths()["purelib"]]))
        probe = subprocess.run(
            [sys.executable, "-S", "-c", _PROBE], capture_output=True, text=True, cwd="/", env=env, timeout=120
        )
        self.assertEqual(probe.returncode, 0, probe.stderr)
        self.assertTrue(probe.stdout.strip().startswith(target), probe.stdout)
        # The plugin cache can be built at install time, so an unprivileged
        # server never tries (and fails) to write it at start-up.
        cache = subprocess.run(
            [sys.executable, "-S", "-m", "tenantedge.plugincache"], capture_output=True, text=True, cwd="/",
            env=env, timeout=120,
        )
        self.assertEqual(cache.returncode, 0, cache.stderr)
        written = os.path.join(target, "twisted", "plugins", "dropin.cache")
        self.assertIn(written, cache.stdout)
        self.assertTrue(os.path.exists(written))
        # The README ships with the package (the systemd unit's Documentation= points at it).
        self.assertTrue(os.path.exists(os.path.join(target, "share", "doc", "tenantedge", "README.md")))
