"""Repository-level pytest configuration.

The ``agentbox`` plugin itself is loaded through its pytest11 entry point (the
package is installed in editable mode by ``scripts/setup.sh``); this file only
makes the repository root importable so test helpers under ``suites`` can be
shared between tiers.
"""

# pytester (used by suites/plugin) must be enabled at the top level.
pytest_plugins = ["pytester"]
