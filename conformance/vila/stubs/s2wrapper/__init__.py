"""STUB of s2wrapper (not on the package index: VILA installs it from a git URL).

Only VILA's S2 / dynamic_s2 vision towers call it; SR3DImageEncoder rejects dynamic_s2 and the harness
builds a plain SigLIP tower, so reaching it is an error.
"""

from _gpu_only import unavailable

forward = unavailable("s2wrapper.forward")
