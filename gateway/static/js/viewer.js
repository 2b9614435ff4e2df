// The 3D view: three.js renders the GLB the API serves, OrbitControls turns
// it with the mouse or touch, and the keys below turn it from the keyboard.
// It renders on demand (on a change), not every frame, so an idle page costs
// nothing, which matters on software WebGL.

import * as THREE from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";

import { fetchFile } from "./api.js";

const BACKGROUND = 0xeef1f5;
const TURN = Math.PI / 12;
const ZOOM = 1.15;
// A three-quarter view from the front (+z faces the camera that took the picture).
const VIEW_DIRECTION = new THREE.Vector3(0.45, 0.3, 1).normalize();

export class Viewer {
  constructor(canvas, message, resetButton) {
    this.canvas = canvas;
    this.message = message;
    this.resetButton = resetButton;
    this.model = null;
    this.loading = null;
    try {
      // preserveDrawingBuffer: a screenshot or readPixels sees the last frame.
      this.renderer = new THREE.WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
    } catch (err) {
      this.renderer = null;
      this.setState("unavailable", `The 3D view needs WebGL, which this browser has turned off (${err.message}). The downloads still work.`);
      return;
    }
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    this.renderer.outputColorSpace = THREE.SRGBColorSpace;
    this.scene = new THREE.Scene();
    this.scene.background = new THREE.Color(BACKGROUND);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x8a8f99, 2.2));
    this.camera = new THREE.PerspectiveCamera(40, 1, 0.01, 100);
    this.light = new THREE.DirectionalLight(0xffffff, 1.6);
    this.camera.add(this.light);
    this.light.position.set(0.5, 1, 0.5);
    this.scene.add(this.camera);
    this.controls = new OrbitControls(this.camera, canvas);
    this.controls.addEventListener("change", () => this.render());
    this.home = { position: new THREE.Vector3(0, 0, 2), target: new THREE.Vector3() };
    this.reset();

    new ResizeObserver(() => this.resize()).observe(canvas.parentElement);
    canvas.addEventListener("keydown", (e) => this.onKey(e));
    resetButton.addEventListener("click", () => this.reset());
    this.resize();
  }

  setState(state, text) {
    this.canvas.dataset.state = state;
    this.message.textContent = text || "";
    this.message.hidden = !text;
  }

  resize() {
    if (!this.renderer) return;
    const { clientWidth: width, clientHeight: height } = this.canvas.parentElement;
    if (!width || !height) return;
    this.renderer.setSize(width, height, false);
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
    this.render();
  }

  render() {
    if (this.renderer) this.renderer.render(this.scene, this.camera);
  }

  clear() {
    this.loading = null;
    if (this.model) {
      this.scene.remove(this.model);
      dispose(this.model);
      this.model = null;
    }
    this.resetButton.disabled = true;
    this.canvas.setAttribute("aria-label", "3D view, empty until a model is ready");
    delete this.canvas.dataset.model;
    if (this.renderer) this.setState("empty", "The model appears here.");
    this.render();
  }

  async load(url, id) {
    if (!this.renderer) return;
    this.clear();
    this.loading = url;
    this.setState("loading", "Loading the model…");
    let gltf;
    try {
      // Fetched through the API helper, so the bearer token goes with it.
      const { blob } = await fetchFile(url);
      gltf = await new GLTFLoader().parseAsync(await blob.arrayBuffer(), "");
    } catch (err) {
      if (this.loading === url) this.setState("error", `Could not show the model: ${err.message}`);
      return;
    }
    if (this.loading !== url) {
      dispose(gltf.scene);
      return;
    }
    this.model = gltf.scene;
    this.scene.add(this.model);
    this.frame(this.model);
    this.reset();
    this.resetButton.disabled = false;
    this.canvas.dataset.model = id;
    this.canvas.setAttribute("aria-label", `3D view of generation ${id}. Arrow keys turn it, plus and minus zoom, 0 resets.`);
    this.setState("ready", "");
  }

  // Aim the camera so the whole model fills the view whatever its size.
  frame(object) {
    const box = new THREE.Box3().setFromObject(object);
    const sphere = box.getBoundingSphere(new THREE.Sphere());
    const radius = Math.max(sphere.radius, 1e-3);
    // The bounding sphere is loose around most shapes; 0.9 of it still keeps every point in view.
    const distance = (radius / Math.sin(THREE.MathUtils.degToRad(this.camera.fov / 2))) * 0.9;
    this.camera.near = distance / 100;
    this.camera.far = distance * 100;
    this.camera.updateProjectionMatrix();
    this.home.target.copy(sphere.center);
    this.home.position.copy(sphere.center).addScaledVector(VIEW_DIRECTION, distance);
  }

  reset() {
    this.camera.position.copy(this.home.position);
    this.controls.target.copy(this.home.target);
    this.controls.update();
    this.render();
  }

  onKey(e) {
    if (!this.model) return;
    const offset = this.camera.position.clone().sub(this.controls.target);
    const spherical = new THREE.Spherical().setFromVector3(offset);
    switch (e.key) {
      case "ArrowLeft": spherical.theta -= TURN; break;
      case "ArrowRight": spherical.theta += TURN; break;
      case "ArrowUp": spherical.phi -= TURN; break;
      case "ArrowDown": spherical.phi += TURN; break;
      case "+": case "=": spherical.radius /= ZOOM; break;
      case "-": case "_": spherical.radius *= ZOOM; break;
      case "0": this.reset(); e.preventDefault(); return;
      default: return;
    }
    e.preventDefault();
    spherical.makeSafe();
    this.camera.position.setFromSpherical(spherical).add(this.controls.target);
    this.controls.update();
    this.render();
  }
}

function dispose(object) {
  object.traverse((node) => {
    if (node.geometry) node.geometry.dispose();
    const materials = Array.isArray(node.material) ? node.material : node.material ? [node.material] : [];
    for (const material of materials) {
      for (const value of Object.values(material)) if (value && value.isTexture) value.dispose();
      material.dispose();
    }
  });
}
