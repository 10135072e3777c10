# Boot entry of an EdgeBFT node (device and Unix port alike).
import sys
sys.path.append("lib")
from edgebft.firmware import runtime
runtime.main()
