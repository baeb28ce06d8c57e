"""Once-for-All supernets: one elastic MobileNetV3, many specialised subnets.

Import the parts you need (``ofa.space``, ``ofa.supernet``, ``ofa.subnet`` …); this
package module stays empty so that ``import ofa.space`` does not pull in torch.
"""
__version__ = "0.1.0"
