"""Generate the synthetic anime-aesthetics benchmark (the project's demo data).

    python ssl/synth.py --out data/synth --preview

See `aessl.synth` for what is drawn, the score function and the difficulty knobs.
"""

import sys

from aessl.synth import main

if __name__ == "__main__":
    sys.exit(main())
