"""The Pulumi program under mocks: the resource graph, config errors, secrets, versions."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pytest
from pulumi.runtime.mocks import MockMonitor

from infra import ami_documents, ami_pipeline, program, reaper_lambda, stack_config, tags

INFRA_DIR = Path(program.__file__).resolve().parent

PROJECT = "ramp-runner"
PARENT_AMI = "ami-0parent0000000001"
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk5bGV4YW1wbGVrZXlleGFtcGxla2V5 organiser@ramp"
OSF_USER = "osf-user-4b1d"
OSF_PASSWORD = "s3cr3t-osf-pa55word"
SECRET_SIGNATURE, SECRET_MARKER = (
    "4dabf18193072939515e22adb298388d",
    "1b47061264138c4ac30d75fd1eb44270",
)
BASE_CONFIG = {
    "aws:region": "eu-west-1",
    "challengeName": "iris",
    "sshCidrs": json.dumps(["203.0.113.7/32", "2001:db8::/64"]),
    "publicKey": PUBLIC_KEY,
}


@dataclass
class Recorded:
    """One resource registered with the mocks, and the resource options the engine got."""

    typ: str
    name: str
    inputs: dict
    outputs: dict
    options: object = field(default=None, repr=False)


class Mocks(pulumi.runtime.Mocks):
    """Computed outputs (id, arn, name) as the provider would return them, in camelCase."""

    def __init__(self):
        self.resources: list[Recorded] = []
        self.calls: list[tuple[str, dict]] = []
        self.requests: dict[str, object] = {}
        self.parent_ami = PARENT_AMI
        # Component version ARNs that exist in the account (what ListComponents returns).
        self.existing_components: set[str] = set()

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        outputs = dict(args.inputs)
        name = outputs.setdefault("name", f"{args.name}-physical")
        if args.typ.startswith("aws:imagebuilder/"):
            kind = {
                "aws:imagebuilder/component:Component": "component",
                "aws:imagebuilder/imageRecipe:ImageRecipe": "image-recipe",
                "aws:imagebuilder/imagePipeline:ImagePipeline": "image-pipeline",
                "aws:imagebuilder/infrastructureConfiguration:InfrastructureConfiguration": (
                    "infrastructure-configuration"
                ),
                "aws:imagebuilder/distributionConfiguration:DistributionConfiguration": (
                    "distribution-configuration"
                ),
                "aws:imagebuilder/lifecyclePolicy:LifecyclePolicy": "lifecycle-policy",
            }[args.typ]
            version = f"/{outputs['version']}" if "version" in outputs else ""
            outputs["arn"] = f"arn:aws:imagebuilder:eu-west-1:123456789012:{kind}/{name}{version}"
        else:
            service = args.typ.split(":")[1].split("/")[0]
            outputs["arn"] = f"arn:aws:{service}:eu-west-1:123456789012:{args.name}"
        request = self.requests.get(args.name)
        self.resources.append(Recorded(args.typ, args.name, dict(args.inputs), outputs, request))
        return [f"{args.name}-id", outputs]

    def call(self, args: pulumi.runtime.MockCallArgs):
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:ssm/getParameter:getParameter":
            return {"name": args.args["name"], "value": self.parent_ami, "type": "String"}
        if args.token == "aws:ec2/getAmi:getAmi":
            [image_id] = args.args["filters"][0]["values"]
            return {"id": image_id, "rootDeviceName": "/dev/sda1", "architecture": "x86_64"}
        if args.token == "aws:imagebuilder/getComponents:getComponents":
            assert args.args["owner"] == "Self"
            wanted = {f["name"]: set(f["values"]) for f in args.args["filters"]}
            arns = sorted(
                arn
                for arn in self.existing_components
                if arn.split("/")[-2] in wanted["name"] and arn.split("/")[-1] in wanted["version"]
            )
            return {"arns": arns, "names": [arn.split("/")[-2] for arn in arns]}
        raise NotImplementedError(args.token)

    def urn(self, resource: Recorded) -> str:
        """URN of a recorded resource (its parent's type qualifies it, as the engine does)."""
        request = resource.options
        parent_type = request.parent.split("::")[2].split("$")[-1]
        return f"urn:pulumi:test::{PROJECT}::{parent_type}${request.type}::{request.name}"

    def of_type(self, suffix: str) -> list[Recorded]:
        """Resources whose type token ends with suffix, e.g. 'ImageRecipe'."""
        return [r for r in self.resources if r.typ.endswith(f":{suffix}")]

    def one(self, suffix: str) -> Recorded:
        """The single resource of a type."""
        found = self.of_type(suffix)
        assert len(found) == 1, [r.name for r in found]
        return found[0]

    def named(self, suffix: str, name_end: str) -> Recorded:
        """The single resource of a type whose logical name ends with name_end."""
        found = [r for r in self.of_type(suffix) if r.name.endswith(name_end)]
        assert len(found) == 1, [r.name for r in self.of_type(suffix)]
        return found[0]

    def component(self, document: str) -> Recorded:
        """The Component of one ami/ document (its name is <challenge>-<document>)."""
        found = [c for c in self.of_type("Component") if c.inputs["name"].endswith(f"-{document}")]
        assert len(found) == 1, [c.inputs["name"] for c in self.of_type("Component")]
        return found[0]

    def recipe_values(self, document: str) -> dict:
        """The parameter values the recipe gives one document's component."""
        arn = self.component(document).outputs["arn"]
        [entry] = [
            c for c in self.one("ImageRecipe").inputs["components"] if c["componentArn"] == arn
        ]
        return {p["name"]: p["value"] for p in entry["parameters"]}


class OptionsMonitor(MockMonitor):
    """The mock monitor, keeping each registration request: its resource options
    (deleteBeforeReplace, retainOnDelete, importId, dependencies) are what the engine plans
    replacements with, and the plain mocks never see them."""

    def RegisterResource(self, request):
        self.mocks.requests[request.name] = request
        return super().RegisterResource(request)


def install_mocks() -> Mocks:
    """Fresh mocks, with the monitor that records resource options."""
    recorder = Mocks()
    pulumi.runtime.set_mocks(
        recorder, project=PROJECT, stack="test", preview=False, monitor=OptionsMonitor(recorder)
    )
    return recorder


@pytest.fixture
def mocks():
    """Fresh mocks and an empty config for each test."""
    yield install_mocks()
    pulumi.runtime.set_all_config({})


def run_program(values: dict, secrets: dict | None = None, documents_dir=None):
    """Set the stack config as `pulumi config set` would and declare the program."""
    secrets = secrets or {}
    full = {(k if ":" in k else f"{PROJECT}:{k}"): v for k, v in {**values, **secrets}.items()}
    pulumi.runtime.set_all_config(full, secret_keys=[f"{PROJECT}:{k}" for k in secrets])
    config = stack_config.read_stack_config()
    kwargs = {"documents_dir": documents_dir} if documents_dir else {}
    return program.build(config, **kwargs)


def settled(outputs: dict, check):
    """An Output that runs check once every stack output (and so every resource) resolved."""
    keys = list(outputs)
    return pulumi.Output.all(*outputs.values()).apply(
        lambda vals: check(dict(zip(keys, vals, strict=True)))
    )


def deploy(config: dict, documents_dir=None, prepare=None) -> Mocks:
    """One whole program run (one `pulumi up`) under fresh mocks; the mocks it left."""
    recorder = install_mocks()
    if prepare:
        prepare(recorder)

    @pulumi.runtime.test
    def declare():
        return settled(run_program(config, documents_dir=documents_dir), lambda _: None)

    declare()
    pulumi.runtime.set_all_config({})
    return recorder


def edited_documents(tmp_path: Path) -> Path:
    """A copy of ami/ with one line of the worker document changed."""
    edited_dir = tmp_path / "ami"
    shutil.copytree(ami_documents.DOCUMENTS_DIR, edited_dir)
    worker = edited_dir / "ramp-worker.yml"
    worker.write_text(worker.read_text().replace("clean --all --yes", "clean --all --quiet --yes"))
    return edited_dir


@pulumi.runtime.test
def test_pipeline_graph_from_components_to_pipeline(mocks):
    outputs = run_program(BASE_CONFIG)

    def check(values):
        pipeline = mocks.one("ImagePipeline")
        recipe = mocks.one("ImageRecipe")
        component = mocks.component("ramp-worker")
        guard = mocks.component("worker-guard")
        infrastructure = mocks.one("InfrastructureConfiguration")
        distribution = mocks.one("DistributionConfiguration")
        assert values["pipelineArn"] == pipeline.outputs["arn"]
        assert pipeline.inputs["imageRecipeArn"] == recipe.outputs["arn"]
        assert pipeline.inputs["infrastructureConfigurationArn"] == infrastructure.outputs["arn"]
        assert pipeline.inputs["distributionConfigurationArn"] == distribution.outputs["arn"]
        assert "schedule" not in pipeline.inputs
        assert pipeline.inputs["imageTestsConfiguration"]["imageTestsEnabled"] is True

        assert [c["componentArn"] for c in recipe.inputs["components"]] == [
            guard.outputs["arn"],
            component.outputs["arn"],
        ]
        worker = ami_documents.load_documents()["ramp-worker"]
        assert component.inputs["data"] == worker.text
        assert component.inputs["version"] == worker.version
        assert component.inputs["platform"] == "Linux"
        assert component.options.retainOnDelete, "images built from a version refer to it"
        parameters = mocks.recipe_values("ramp-worker")
        assert set(parameters) == set(worker.parameters)
        assert parameters["ChallengeName"] == "iris"
        assert parameters["KitRepository"] == "https://github.com/ramp-kits/iris.git"
        assert parameters["DataSource"] == "none"
        assert all(parameters.values()), "AWSTOE rejects empty parameter values"

        assert recipe.inputs["parentImage"] == f"ssm:{stack_config.UBUNTU_2204_PARAMETER}"
        [device] = recipe.inputs["blockDeviceMappings"]
        assert device["deviceName"] == "/dev/sda1"
        assert device["ebs"]["volumeSize"] == 30
        lookups = [(token, args) for token, args in mocks.calls if "getComponents" not in token]
        assert [token for token, _ in lookups] == [
            "aws:ssm/getParameter:getParameter",
            "aws:ec2/getAmi:getAmi",
        ]
        assert lookups[0][1]["name"] == stack_config.UBUNTU_2204_PARAMETER

        [dist] = distribution.inputs["distributions"]
        assert dist["region"] == "eu-west-1"
        ami = dist["amiDistributionConfiguration"]
        assert ami["name"] == "iris-ramp-worker-{{ imagebuilder:buildDate }}"
        assert ami["amiTags"][tags.TAG_AMI_BASE_NAME] == "iris-ramp-worker"
        assert ami["amiTags"][tags.TAG_CHALLENGE] == "iris"
        assert values["amiBaseName"] == "iris-ramp-worker"
        assert values["buildLogGroup"] == f"/aws/imagebuilder/{recipe.inputs['name']}"

    return settled(outputs, check)


@pulumi.runtime.test
def test_build_instance_profile_role_has_ssm_core_and_no_data_access(mocks):
    outputs = run_program(BASE_CONFIG)

    def check(_):
        infrastructure = mocks.one("InfrastructureConfiguration")
        profile = mocks.one("InstanceProfile")
        role = mocks.named("Role", "-build-role")
        assert infrastructure.inputs["instanceProfileName"] == profile.outputs["name"]
        assert profile.inputs["role"] == role.outputs["name"]
        assume = json.loads(role.inputs["assumeRolePolicy"])
        assert assume["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
        attached = {
            a.inputs["policyArn"]
            for a in mocks.of_type("RolePolicyAttachment")
            if a.inputs["role"] == role.outputs["name"]
        }
        assert "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore" in attached
        own = [p for p in mocks.of_type("RolePolicy") if p.inputs["role"] == role.outputs["name"]]
        assert own == [], "dataSource none needs no data access"
        assert infrastructure.inputs["terminateInstanceOnFailure"] is True
        assert infrastructure.inputs["instanceTypes"] == ["m5.large"]
        assert infrastructure.inputs["instanceMetadataOptions"]["httpTokens"] == "required"

    return settled(outputs, check)


@pulumi.runtime.test
def test_security_group_allows_ssh_from_configured_cidrs_only(mocks):
    outputs = run_program(BASE_CONFIG)

    def check(values):
        group = mocks.one("SecurityGroup")
        [rule] = group.inputs["ingress"]
        assert (rule["protocol"], rule["fromPort"], rule["toPort"]) == ("tcp", 22, 22)
        assert rule["cidrBlocks"] == ["203.0.113.7/32"]
        assert rule["ipv6CidrBlocks"] == ["2001:db8::/64"]
        assert values["securityGroupName"] == group.outputs["name"] == "iris-ramp-workers"
        assert values["securityGroupId"] == f"{group.name}-id"
        key = mocks.one("KeyPair")
        assert key.inputs["publicKey"] == PUBLIC_KEY
        assert values["keyName"] == key.inputs["keyName"] == "iris-ramp-worker"
        assert values["region"] == "eu-west-1"
        assert values["remoteKitFolder"] == "/home/ubuntu/ramp-kits/iris"

    return settled(outputs, check)


@pulumi.runtime.test
def test_workers_reach_nothing_unless_the_stack_opens_egress(mocks):
    """A submission runs on an AMI holding the private test data: by default its instance
    may answer the dispatcher's SSH (security groups are stateful) and nothing else."""
    closed = run_program(BASE_CONFIG)

    def check(_):
        assert mocks.one("SecurityGroup").inputs["egress"] == []

    return settled(closed, check)


@pulumi.runtime.test
def test_worker_egress_opens_when_asked(mocks):
    outputs = run_program({**BASE_CONFIG, "allowWorkerEgress": "true"})

    def check(_):
        [rule] = mocks.one("SecurityGroup").inputs["egress"]
        assert (rule["protocol"], rule["fromPort"], rule["toPort"]) == ("-1", 0, 0)
        assert rule["cidrBlocks"] == ["0.0.0.0/0"]
        assert rule["ipv6CidrBlocks"] == ["::/0"]

    return settled(outputs, check)


@pulumi.runtime.test
def test_ssh_from_anywhere_only_when_asked(mocks):
    open_config = {**BASE_CONFIG, "sshCidrs": json.dumps(["0.0.0.0/0"])}
    with pytest.raises(stack_config.StackConfigError, match="sshCidrs"):
        run_program(open_config)
    outputs = run_program({**open_config, "allowSshFromAnywhere": "true"})

    def check(_):
        [rule] = mocks.one("SecurityGroup").inputs["ingress"]
        assert rule["cidrBlocks"] == ["0.0.0.0/0"]

    return settled(outputs, check)


@pulumi.runtime.test
def test_osf_credentials_live_only_in_ssm_secure_strings(mocks):
    secrets = {"osfUsername": OSF_USER, "osfPassword": OSF_PASSWORD}
    outputs = run_program({**BASE_CONFIG, "dataSource": "osf"}, secrets)

    def check(_):
        parameters = mocks.of_type("Parameter")
        assert {p.inputs["name"] for p in parameters} == {
            "/ramp-runner/iris/osf-username",
            "/ramp-runner/iris/osf-password",
        }
        assert {p.inputs["type"] for p in parameters} == {"SecureString"}
        # Pulumi hands secret inputs to the provider wrapped with its secret signature.
        values = [p.inputs["value"] for p in parameters]
        assert all(v.get(SECRET_SIGNATURE) == SECRET_MARKER for v in values)
        assert {v["value"] for v in values} == {OSF_USER, OSF_PASSWORD}
        for resource in mocks.resources:
            if resource.typ == "aws:ssm/parameter:Parameter":
                continue
            text = json.dumps(resource.inputs, default=str)
            assert OSF_PASSWORD not in text, resource.name
            assert OSF_USER not in text, resource.name
        values = mocks.recipe_values("ramp-worker")
        assert values["OsfUsernameParameter"] == "/ramp-runner/iris/osf-username"
        assert values["OsfPasswordParameter"] == "/ramp-runner/iris/osf-password"
        policy = json.loads(mocks.named("RolePolicy", "-build-data").inputs["policy"])
        [statement] = policy["Statement"]
        assert statement["Action"] == "ssm:GetParameter"
        assert sorted(statement["Resource"]) == sorted(p.outputs["arn"] for p in parameters)

    return settled(outputs, check)


@pulumi.runtime.test
def test_s3_data_source_reads_only_its_prefix(mocks):
    config = {**BASE_CONFIG, "dataSource": "s3", "dataBucket": "ramp-data", "dataPrefix": "iris/v2"}
    outputs = run_program(config)

    def check(_):
        policy = json.loads(mocks.named("RolePolicy", "-build-data").inputs["policy"])
        resources = {s["Action"]: s["Resource"] for s in policy["Statement"]}
        assert resources == {
            "s3:ListBucket": "arn:aws:s3:::ramp-data",
            "s3:GetObject": "arn:aws:s3:::ramp-data/iris/v2/*",
        }
        values = mocks.recipe_values("ramp-worker")
        assert values["DataS3Uri"] == "s3://ramp-data/iris/v2/"
        assert mocks.of_type("Parameter") == []

    return settled(outputs, check)


@pulumi.runtime.test
def test_gpu_drivers_component_comes_first(mocks):
    config = {**BASE_CONFIG, "gpuDrivers": "true", "parentImage": "ami-0given", "volumeSize": "80"}
    outputs = run_program(config)

    def check(_):
        components = {c.outputs["arn"]: c for c in mocks.of_type("Component")}
        recipe = mocks.one("ImageRecipe")
        names = [components[c["componentArn"]].inputs["name"] for c in recipe.inputs["components"]]
        assert names == ["iris-gpu-drivers", "iris-worker-guard", "iris-ramp-worker"]
        assert recipe.inputs["blockDeviceMappings"][0]["ebs"]["volumeSize"] == 80
        assert recipe.inputs["parentImage"] == "ami-0given"
        tokens = [token for token, _ in mocks.calls if "getComponents" not in token]
        assert tokens == ["aws:ec2/getAmi:getAmi"]

    return settled(outputs, check)


def test_editing_one_line_gives_new_component_version_and_replaced_recipe(tmp_path):
    before, after = deploy(BASE_CONFIG), deploy(BASE_CONFIG, edited_documents(tmp_path))
    old, new = before.component("ramp-worker"), after.component("ramp-worker")
    assert old.inputs["name"] == new.inputs["name"]
    assert old.inputs["version"] != new.inputs["version"]
    assert old.outputs["arn"] != new.outputs["arn"]
    old_recipe, new_recipe = before.one("ImageRecipe"), after.one("ImageRecipe")
    assert old_recipe.inputs["version"] != new_recipe.inputs["version"]
    assert new_recipe.inputs["components"][1]["componentArn"] == new.outputs["arn"]
    assert after.one("ImagePipeline").inputs["imageRecipeArn"] == new_recipe.outputs["arn"]
    unchanged = deploy(BASE_CONFIG).one("ImageRecipe")
    assert unchanged.inputs["version"] == old_recipe.inputs["version"]


def test_second_deploy_creates_the_new_recipe_before_deleting_the_one_in_use(tmp_path):
    """What the engine does on the second `pulumi up`, read from what the program registers.

    The recipe keeps its logical name and its explicit `name` while its version (a
    create-only property) changes: the engine plans a replacement. Because `name` is set
    explicitly, pulumi-terraform-bridge answers Diff with DeleteBeforeReplace
    (nameRequiresDeleteBeforeReplace), and the engine would delete the old recipe first,
    which Image Builder refuses while the pipeline uses it (ResourceDependencyException;
    terraform-provider-aws issues 39985, 40128). A deleteBeforeReplace option that is
    *defined and false* overrides the provider (pulumi step_generator: "The user can override
    the provider's decision"), so the engine creates the new version, updates the pipeline in
    place (its imageRecipeArn depends on the recipe), and deletes the old recipe last.
    """
    before, after = deploy(BASE_CONFIG), deploy(BASE_CONFIG, edited_documents(tmp_path))
    old_recipe, new_recipe = before.one("ImageRecipe"), after.one("ImageRecipe")
    assert (old_recipe.name, old_recipe.inputs["name"]) == (
        new_recipe.name,
        new_recipe.inputs["name"],
    )
    assert old_recipe.inputs["version"] != new_recipe.inputs["version"]
    options = new_recipe.options
    assert options.deleteBeforeReplaceDefined, (
        "the provider's delete-before-replace must be overridden"
    )
    assert options.deleteBeforeReplace is False
    pipeline = after.one("ImagePipeline")
    assert pipeline.name == before.one("ImagePipeline").name
    assert pipeline.inputs["imageRecipeArn"] == new_recipe.outputs["arn"]
    recipe_urn = after.urn(new_recipe)
    assert recipe_urn in pipeline.options.propertyDependencies["imageRecipeArn"].urns


def test_a_new_canonical_ami_does_not_change_the_recipe():
    """Image Builder resolves an `ssm:` parent image itself when a build starts, so a new
    Ubuntu release (a new value of Canonical's parameter) leaves the recipe as it is."""

    def newer_ubuntu(recorder):
        recorder.parent_ami = "ami-0newer0000000002"

    first, second = deploy(BASE_CONFIG), deploy(BASE_CONFIG, prepare=newer_ubuntu)
    old, new = first.one("ImageRecipe"), second.one("ImageRecipe")
    assert new.inputs == old.inputs
    assert new.inputs["parentImage"] == f"ssm:{stack_config.UBUNTU_2204_PARAMETER}"


def test_component_versions_never_collide_after_a_revert_or_a_destroy(tmp_path):
    """A -> B -> A, then `pulumi destroy` and `pulumi up` again, against one account.

    Component versions are kept in the account when Pulumi lets go of them (images built
    from them refer to them), so a version can already exist when the program wants it:
    after a revert, or after a destroy. CreateComponent refuses an existing name and
    version, so the program must adopt it instead (the `import` option, whose ID is the
    build-version ARN). Each version is its own logical resource, so a reverted version is
    not the one in the state; and an import of a resource already in the state with that ID
    is an ordinary no-op (pulumi developer-docs/architecture/import.md), so declaring it on
    every run is safe.
    """
    account: set[str] = set()
    original, edited = ami_documents.DOCUMENTS_DIR, edited_documents(tmp_path)

    def same_account(recorder):
        recorder.existing_components = account

    seen = []
    for documents_dir in (original, edited, original, original):
        recorder = deploy(BASE_CONFIG, documents_dir, prepare=same_account)
        component = recorder.component("ramp-worker")
        version_arn = component.outputs["arn"]
        if version_arn in account:
            assert component.options.importId == f"{version_arn}/1", "must adopt, not create"
        else:
            assert component.options.importId == ""
        recipe = recorder.one("ImageRecipe")
        assert recipe.inputs["components"][1]["componentArn"] == version_arn
        account.add(version_arn)
        seen.append(component)
    assert [c.outputs["arn"] for c in seen[1:]] == [
        seen[1].outputs["arn"],
        seen[0].outputs["arn"],
        seen[0].outputs["arn"],
    ]
    assert seen[0].outputs["arn"] != seen[1].outputs["arn"]
    assert all(c.options.retainOnDelete for c in seen), "replaced versions stay in the account"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"challengeName": None}, "challengeName"),
        ({"challengeName": "Iris Challenge"}, "challengeName"),
        ({"sshCidrs": None}, "sshCidrs"),
        ({"sshCidrs": json.dumps(["10.0.0.300/32"])}, "sshCidrs"),
        ({"sshCidrs": json.dumps(["10.0.0.1/8"])}, "sshCidrs"),
        ({"sshCidrs": json.dumps(["::/0"])}, "sshCidrs"),
        ({"publicKey": "not a key"}, "publicKey"),
        ({"dataSource": "ftp"}, "dataSource"),
        ({"dataSource": "s3"}, "dataBucket"),
        ({"dataSource": "osf"}, "osfUsername"),
        ({"volumeSize": "big"}, "volumeSize"),
        ({"volumeSize": "4"}, "volumeSize"),
        ({"gpuDrivers": "yes"}, "gpuDrivers"),
        ({"gpuDriverVersion": '535"; reboot; "'}, "gpuDriverVersion"),
        ({"gpuDriverVersion": "latest"}, "gpuDriverVersion"),
        ({"instanceTypes": json.dumps([])}, "instanceTypes"),
        ({"instanceUser": "Root User"}, "instanceUser"),
        ({"amiBaseName": "x" * 101}, "amiBaseName"),
        ({"amiBaseName": "x" * 99}, "amiBaseName"),
        ({"amiBaseName": "iris(gpu)"}, "amiBaseName"),
        ({"amiBaseName": "iris/worker"}, "amiBaseName"),
        ({"amiBaseName": "iris@ramp"}, "amiBaseName"),
        ({"amiBaseName": "iris:gpu"}, "amiBaseName"),
        ({"amiBaseName": "iris {{ x }}"}, "amiBaseName"),
        ({"challengeName": "sg-iris"}, "challengeName"),
        ({"allowWorkerEgress": "open"}, "allowWorkerEgress"),
        ({"keepAmis": "0"}, "keepAmis"),
        ({"keepAmis": "1001"}, "keepAmis"),
        ({"keepAmis": "all"}, "keepAmis"),
        ({"workerInstanceTypes": json.dumps([])}, "workerInstanceTypes"),
        ({"workerInstanceTypes": json.dumps(["m5.large", "*"])}, "workerInstanceTypes"),
        ({"workerInstanceTypes": json.dumps(["*.*"])}, "workerInstanceTypes"),
        ({"workerInstanceTypes": json.dumps(['t3.large"}']) }, "workerInstanceTypes"),
    ],
)
def test_bad_config_names_the_key(changes, key):
    raw = {k: v for k, v in {**BASE_CONFIG, **changes}.items() if v is not None}
    with pytest.raises(stack_config.StackConfigError, match=f"'{key}'") as error:
        stack_config.parse_stack_config(raw, {}, "eu-west-1")
    assert error.value.key == key


@pytest.mark.parametrize("base_name", ["iris-ramp-worker", "Iris_GPU.v2", "x" * 98, "ab"])
def test_accepted_ami_base_names_give_names_image_builder_accepts(base_name):
    """The distribution's AMI name, checked against Image Builder's own service model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("imagebuilder")
    rules = model.shape_for("AmiNameString").metadata
    raw = {**BASE_CONFIG, "amiBaseName": base_name}
    config = stack_config.parse_stack_config(raw, {}, "eu-west-1")
    name = ami_pipeline.ami_name_pattern(config.ami_base_name)
    assert rules["min"] <= len(name) <= rules["max"]
    assert re.fullmatch(rules["pattern"].strip("^$"), name)


def test_missing_region_names_the_key(mocks):
    config = {k: v for k, v in BASE_CONFIG.items() if k != "aws:region"}
    pulumi.runtime.set_all_config({f"{PROJECT}:{k}": v for k, v in config.items()})
    with pytest.raises(stack_config.StackConfigError, match="aws:region"):
        stack_config.read_stack_config()


def test_config_defaults_and_comma_lists():
    raw = {**BASE_CONFIG, "sshCidrs": "203.0.113.7/32, 198.51.100.0/24"}
    config = stack_config.parse_stack_config(raw, {}, "eu-west-1")
    assert config.ssh_cidrs == ("203.0.113.7/32", "198.51.100.0/24")
    assert config.parent_image == stack_config.UBUNTU_2204_PARAMETER
    assert (config.kit_ref, config.instance_user, config.volume_size) == ("HEAD", "ubuntu", 30)
    assert (config.gpu_drivers, config.data_source, config.key_name) == (
        False,
        "none",
        "iris-ramp-worker",
    )
    # Workers may use the types the AMI was built and tested on, unless the stack says more.
    assert config.worker_instance_types == config.instance_types == ("m5.large",)
    assert config.keep_amis == 3


def test_example_stack_config_is_valid():
    example = __import__("yaml").safe_load((INFRA_DIR / "Pulumi.example.yaml").read_text())
    raw = {
        key.split(":", 1)[1]: value if isinstance(value, str) else json.dumps(value)
        for key, value in example["config"].items()
        if key.startswith(f"{PROJECT}:")
    }
    assert set(raw) <= set(stack_config.PLAIN_KEYS)
    config = stack_config.parse_stack_config(raw, {}, example["config"]["aws:region"])
    assert config.challenge_name == "iris"


def statements(policy_document: str) -> list[dict]:
    """The statements of a JSON policy document."""
    return json.loads(policy_document)["Statement"]


@pulumi.runtime.test
def test_launch_template_requires_imdsv2_encrypts_and_terminates(mocks):
    outputs = run_program(BASE_CONFIG)

    def check(values):
        template = mocks.one("LaunchTemplate")
        metadata = template.inputs["metadataOptions"]
        assert metadata["httpTokens"] == "required"
        assert metadata["httpPutResponseHopLimit"] == 1
        assert metadata["httpEndpoint"] == "enabled"
        # The mapping must name the parent image's root device, or it adds a second volume.
        [device] = template.inputs["blockDeviceMappings"]
        assert device["deviceName"] == "/dev/sda1"
        assert device["ebs"]["encrypted"] == "true"
        assert device["ebs"]["deleteOnTermination"] == "true"
        assert template.inputs["instanceInitiatedShutdownBehavior"] == "terminate"
        assert template.inputs["keyName"] == mocks.one("KeyPair").outputs["keyName"]
        assert template.inputs["vpcSecurityGroupIds"] == [values["securityGroupId"]]
        assert "imageId" not in template.inputs, "the dispatcher picks the newest AMI"
        specs = template.inputs["tagSpecifications"]
        tagged = {spec["resourceType"]: spec["tags"] for spec in specs}
        assert tagged == {kind: {tags.TAG_CHALLENGE: "iris"} for kind in ("instance", "volume")}
        assert values["launchTemplateId"] == f"{template.name}-id"
        assert values["launchTemplateName"] == template.outputs["name"] == "iris-ramp-worker"
        assert values["workerTags"] == {tags.TAG_CHALLENGE: "iris"}

    return settled(outputs, check)


@pulumi.runtime.test
def test_dispatcher_may_launch_only_through_the_template_with_the_worker_tags(mocks):
    config = {**BASE_CONFIG, "workerInstanceTypes": json.dumps(["t3.large", "g5.*"])}
    outputs = run_program(config)

    def check(values):
        policy = mocks.one("Policy")
        assert values["dispatcherPolicyArn"] == policy.outputs["arn"]
        template_arn = mocks.one("LaunchTemplate").outputs["arn"]
        found = statements(policy.inputs["policy"])
        launches = [s for s in found if s["Action"] == "ec2:RunInstances"]
        assert launches
        for statement in launches:
            assert statement["Resource"] != "*", statement
            condition = statement["Condition"]
            assert condition["ArnEquals"] == {"ec2:LaunchTemplate": template_arn}, statement
        by_sid = {s["Sid"]: s for s in found}
        instance = by_sid["LaunchInstance"]["Condition"]
        assert instance["StringLike"] == {"ec2:InstanceType": ["t3.large", "g5.*"]}
        for sid in ("LaunchInstance", "LaunchVolume"):
            condition = by_sid[sid]["Condition"]
            assert condition["StringEquals"] == {f"aws:RequestTag/{tags.TAG_CHALLENGE}": "iris"}
            assert condition["Null"] == {
                f"aws:RequestTag/{tags.TAG_EVENT}": "false",
                f"aws:RequestTag/{tags.TAG_DEADLINE}": "false",
            }
            assert condition["ForAllValues:StringLike"] == {
                "aws:TagKeys": [f"{tags.TAG_PREFIX}*", "Name"]
            }
        image = by_sid["LaunchStackImage"]
        assert image["Resource"] == "arn:aws:ec2:eu-west-1::image/*"
        assert image["Condition"]["StringEquals"] == {
            f"aws:ResourceTag/{tags.TAG_AMI_BASE_NAME}": "iris-ramp-worker"
        }
        own = {"StringEquals": {f"aws:ResourceTag/{tags.TAG_CHALLENGE}": "iris"}}
        assert by_sid["TerminateOwnWorkers"]["Condition"] == own
        tagging = [s for s in found if s["Action"] == "ec2:CreateTags"]
        assert all("Condition" in s for s in tagging)
        # After the launch, only what a reused instance's next run changes.
        assert by_sid["MoveDeadline"]["Condition"]["ForAllValues:StringEquals"] == {
            "aws:TagKeys": [tags.TAG_DEADLINE, tags.TAG_SUBMISSION, "Name"]}

    return settled(outputs, check)


@pulumi.runtime.test
def test_recipe_builds_from_an_encrypted_root_volume(mocks):
    outputs = run_program(BASE_CONFIG)

    def check(_):
        [device] = mocks.one("ImageRecipe").inputs["blockDeviceMappings"]
        assert device["ebs"]["encrypted"] == "true"

    return settled(outputs, check)


def snake(name: str) -> str:
    """A Pulumi input name (camelCase) as the Python argument it came from."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_every_recipe_input_but_tags_is_hashed_into_its_version():
    """CreateImageRecipe has no update: whatever the recipe is given, except its tags,
    replaces it, so all of it must reach the version, or the replacement reuses the
    name and version Image Builder already has."""
    recorder = deploy(BASE_CONFIG)
    recipe = recorder.one("ImageRecipe")
    config = stack_config.parse_stack_config(BASE_CONFIG, {}, "eu-west-1")
    hashed = ami_pipeline.recipe_arguments(
        config, f"ssm:{stack_config.UBUNTU_2204_PARAMETER}", "/dev/sda1"
    )
    given = {snake(key) for key in recipe.inputs} - {"version", "tags", "components"}
    assert given == set(hashed)


@pytest.mark.parametrize(
    ("argument", "change"),
    [
        ("volume_type", lambda a: a["block_device_mappings"][0]["ebs"].update(volume_type="gp2")),
        (
            "delete_on_termination",
            lambda a: a["block_device_mappings"][0]["ebs"].update(delete_on_termination="false"),
        ),
        ("encrypted", lambda a: a["block_device_mappings"][0]["ebs"].update(encrypted="false")),
        ("description", lambda a: a.update(description="another description")),
        ("working_directory", lambda a: a.update(working_directory="/opt/build")),
    ],
)
def test_recipe_version_follows_every_replacement_forcing_argument(monkeypatch, argument, change):
    before = deploy(BASE_CONFIG).one("ImageRecipe")
    original = ami_pipeline.recipe_arguments

    def changed(*args):
        arguments = original(*args)
        change(arguments)
        return arguments

    monkeypatch.setattr(ami_pipeline, "recipe_arguments", changed)
    after = deploy(BASE_CONFIG).one("ImageRecipe")
    assert after.inputs != before.inputs, argument
    assert after.inputs["version"] != before.inputs["version"], argument


@pytest.mark.parametrize(("keep", "expected"), [(None, 3), ("7", 7)])
@pulumi.runtime.test
def test_lifecycle_policy_deletes_amis_and_snapshots_beyond_the_newest(mocks, keep, expected):
    config = {**BASE_CONFIG, **({"keepAmis": keep} if keep else {})}
    outputs = run_program(config)

    def check(values):
        policy = mocks.one("LifecyclePolicy")
        assert policy.inputs["resourceType"] == "AMI_IMAGE"
        assert policy.inputs["status"] == "ENABLED"
        [detail] = policy.inputs["policyDetails"]
        assert detail["action"]["type"] == "DELETE"
        assert detail["action"]["includeResources"] == {"amis": True, "snapshots": True}
        assert detail["filter"] == {"type": "COUNT", "value": expected}
        assert policy.inputs["resourceSelection"] == {"tagMap": {tags.TAG_CHALLENGE: "iris"}}
        # Images built by the pipeline carry no pipeline tags: build-ami passes these.
        assert values["imageTags"] == policy.inputs["resourceSelection"]["tagMap"]
        role = mocks.named("Role", "-ami-lifecycle-role")
        assert policy.inputs["executionRole"] == role.outputs["arn"]
        [trust] = statements(role.inputs["assumeRolePolicy"])
        assert trust["Principal"] == {"Service": "imagebuilder.amazonaws.com"}
        [attached] = [
            a for a in mocks.of_type("RolePolicyAttachment")
            if a.inputs["role"] == role.outputs["name"]
        ]
        assert attached.inputs["policyArn"].endswith("/EC2ImageBuilderLifecycleExecutionPolicy")
        assert values["lifecyclePolicyArn"] == policy.outputs["arn"]

    return settled(outputs, check)


def test_reaper_schedule_runs_the_lambda_whose_role_terminates_only_the_challenge():
    # The schedule waits on the function's ARN: read the resources once the whole program ran.
    mocks = deploy(BASE_CONFIG)
    function = mocks.one("Function")
    schedule = mocks.one("Schedule")
    assert schedule.inputs["scheduleExpression"] == "rate(5 minutes)"
    assert schedule.inputs["flexibleTimeWindow"] == {"mode": "OFF"}
    target = schedule.inputs["target"]
    assert target["arn"] == function.outputs["arn"]
    scheduler_role = mocks.named("Role", "-reaper-scheduler-role")
    assert target["roleArn"] == scheduler_role.outputs["arn"]
    [trust] = statements(scheduler_role.inputs["assumeRolePolicy"])
    assert trust["Principal"] == {"Service": "scheduler.amazonaws.com"}
    invoke = mocks.named("RolePolicy", "-reaper-invoke")
    assert invoke.inputs["role"] == scheduler_role.outputs["name"]
    assert statements(invoke.inputs["policy"]) == [
        {
            "Effect": "Allow",
            "Action": "lambda:InvokeFunction",
            "Resource": function.outputs["arn"],
        }
    ]

    assert function.inputs["handler"] == "reaper_lambda.handler"
    assert function.inputs["runtime"].startswith("python3.")
    assert set(function.inputs["code"].assets) == {"reaper_lambda.py"}
    assert function.inputs["code"].assets["reaper_lambda.py"].path == reaper_lambda.__file__
    assert function.inputs["environment"]["variables"] == {
        "CHALLENGE_TAG": tags.TAG_CHALLENGE,
        "CHALLENGE_NAME": "iris",
        "DEADLINE_TAG": tags.TAG_DEADLINE,
    }
    role = mocks.named("Role", "-reaper-role")
    assert function.inputs["role"] == role.outputs["arn"]
    [trust] = statements(role.inputs["assumeRolePolicy"])
    assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    allowed = statements(mocks.named("RolePolicy", "-reaper-terminate").inputs["policy"])
    ec2_actions = {s["Action"]: s for s in allowed if str(s["Action"]).startswith("ec2:")}
    assert set(ec2_actions) == {"ec2:DescribeInstances", "ec2:TerminateInstances"}
    assert ec2_actions["ec2:TerminateInstances"]["Condition"] == {
        "StringEquals": {f"aws:ResourceTag/{tags.TAG_CHALLENGE}": "iris"}
    }
    log_group = mocks.one("LogGroup")
    assert log_group.inputs["name"] == f"/aws/lambda/{function.inputs['name']}"
    [logs] = [s for s in allowed if s not in ec2_actions.values()]
    assert logs["Resource"] == f"{log_group.outputs['arn']}:*"


@pulumi.runtime.test
def test_worker_contract_outputs(mocks):
    outputs = run_program(BASE_CONFIG)

    def check(values):
        assert values["runUser"] == "ramp-run"
        assert values["heartbeatFile"] == "/run/ramp-runner/heartbeat"
        assert values["heartbeatTimeoutSeconds"] == 600
        guard = mocks.recipe_values("worker-guard")
        assert guard == {
            "InstanceUser": "ubuntu",
            "RunUser": values["runUser"],
            "HeartbeatFile": values["heartbeatFile"],
            "HeartbeatTimeout": str(values["heartbeatTimeoutSeconds"]),
        }

    return settled(outputs, check)


def test_every_iam_document_is_one_iam_accepts(monkeypatch):
    """moto's IAM checks documents as IAM does (condition operators, action prefixes,
    ARNs): each policy and trust policy the stack makes is created there once."""
    import boto3
    from moto import mock_aws

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    recorder = deploy({**BASE_CONFIG, "dataSource": "s3", "dataBucket": "ramp-data"})
    documents = [r.inputs["policy"] for r in recorder.of_type("Policy")]
    documents += [r.inputs["policy"] for r in recorder.of_type("RolePolicy")]
    trusts = [r.inputs["assumeRolePolicy"] for r in recorder.of_type("Role")]
    assert len(documents) == 4 and len(trusts) == 4
    with mock_aws():
        iam = boto3.client("iam", region_name="us-east-1")
        for number, document in enumerate(documents):
            iam.create_policy(PolicyName=f"policy-{number}", PolicyDocument=document)
        for number, trust in enumerate(trusts):
            iam.create_role(RoleName=f"role-{number}", AssumeRolePolicyDocument=trust)
