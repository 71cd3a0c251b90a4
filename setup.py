from setuptools import find_packages, setup


def read_version() -> str:
    namespace: dict = {}
    with open('mmsparsevit/version.py', encoding='utf-8') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='mmsparsevit',
    version=read_version(),
    description='Efficient-attention vision transformers (VVT, LIT, KVT) as OpenMMLab '
    'backbones for detection and segmentation',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache License 2.0',
    packages=find_packages(exclude=('configs', 'tools', 'tests')),
    python_requires='>=3.8',
    # torch (and torchvision) are prerequisites, installed to match the machine's CUDA, as in
    # OpenMMLab projects; mmdet 3.3 and mmseg 1.2 refuse mmcv >= 2.2.0.
    install_requires=[
        'mmengine>=0.10.0,<0.11.0',
        'mmcv>=2.0.0,<2.2.0',
        'mmdet>=3.0.0,<3.4.0',
        'mmsegmentation>=1.0.0,<1.3.0',
        'timm>=0.9.0',
        'ftfy',
        'regex',
    ],
    extras_require={'tests': ['pytest', 'pycocotools']},
    zip_safe=False,
)
