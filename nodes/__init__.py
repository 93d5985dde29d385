"""ComfyUI V3 nodes for DreamPose: thin adapters from ComfyUI types to the ``dreampose`` library.

Node IDs and input order are part of every saved workflow (widget values are stored by position):
never rename or reorder them; add new inputs at the end.
"""
from .apply_pose import DreamPoseApplyPose
from .demo import DreamPoseDemoModel, DreamPoseSyntheticPerson
from .densepose import DreamPoseDensePose, DreamPoseLoadIUV, DreamPoseSaveUV
from .encode import CLIPVAEAdapterEncode
from .finetune import SubjectFinetune, VAEDecoderFinetune
from .loader import LoadDreamPose
from .poses import DensePoseWindow5, DreamPoseLoadUV
from .sampler import DualCFGSampler

NODES = [LoadDreamPose, CLIPVAEAdapterEncode, DreamPoseLoadUV, DensePoseWindow5, DualCFGSampler, SubjectFinetune,
         VAEDecoderFinetune]
NODES += [DreamPoseDensePose, DreamPoseSaveUV, DreamPoseLoadIUV]
NODES += [DreamPoseDemoModel, DreamPoseSyntheticPerson]
NODES += [DreamPoseApplyPose]
