"""A module path from before the packages, kept until the next release (`cvt._MOVED` names
its new home)."""

import cvt

cvt._reexport_moved(__name__)
